"""Mutation check: plant plausible one-line bugs, one at a time, and see the tests catch each.

Each mutant replaces one exact line fragment in a scratch copy of the repository (a temporary
folder; the working tree is never touched), then runs the test files that guard that code. A
mutant is *caught* when those tests fail. Run it after changing a core module:

    python tests/mutation_check.py            # focused tests per mutant (about a minute)
    python tests/mutation_check.py --full     # whole test files per mutant (several minutes)
    python tests/mutation_check.py --only longrope_ge plan_index_sizing

It prints a table (mutant, tests, result, seconds) and exits 1 when a mutant that CPU tests
should catch survives, when a mutant's line is no longer in the source (the check went stale:
update it), or when the unmutated tests fail (the baseline run, skipped by --skip-baseline).
GPU-only mutants run only where JAX sees a GPU; elsewhere they are listed as "GPU only".
Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file, relative to the repository root
    original: str  # exact fragment that must occur once in the file
    mutated: str
    tests: tuple[str, ...]  # test files that must fail
    focus: str | None = None  # pytest -k expression selecting the guarding tests (default run)
    gpu_only: bool = False


MUTANTS = (
    Mutant(
        "cli_always_dense",
        "minference_jax/prefill.py",
        "ids[None], AttentionSpec(table), args",
        "ids[None], AttentionSpec(), args",
        ("tests/test_prefill_cli.py",),
    ),
    Mutant(
        "plan_index_sizing",
        "minference_jax/index_approx.py",
        "diag_bounds.append(max_slash * (ratio + 1) + ratio)",
        "diag_bounds.append(max_slash * ratio + ratio)",
        ("tests/test_sparse_index.py",),
        focus="twice_block_kv or capacity",
    ),
    Mutant(
        "longrope_ge",
        "minference_jax/models/rope.py",
        "use_long = seq_len > (rope.original_max_position_embeddings or 0)",
        "use_long = seq_len >= (rope.original_max_position_embeddings or 0)",
        ("tests/test_models.py",),
        focus="original_context or phi3_longrope",
    ),
    Mutant(
        "longrope_always_long",
        "minference_jax/models/rope.py",
        "use_long = seq_len > (rope.original_max_position_embeddings or 0)",
        "use_long = True",
        ("tests/test_models.py",),
        focus="original_context or phi3_longrope",
    ),
    Mutant(
        "adaptive_vs_limit_ignored",
        "minference_jax/index_approx.py",
        "chosen = always | jnp.where(overflow, top, rest)",
        "chosen = always | rest",
        ("tests/test_adaptive.py",),
        focus="adaptive_vertical_slash",
    ),
    Mutant(
        "radix_digit_as_any",
        "minference_jax/index_approx.py",
        "digit = (sums >= target[None]).sum(0, dtype=jnp.uint32)",
        "digit = (sums >= target[None]).any(0).astype(jnp.uint32)",
        ("tests/test_adaptive.py",),
        focus="threshold_keep or select_by_threshold",
    ),
    Mutant(
        "oracle_keys_unsorted",
        "minference_jax/recall.py",
        "gathered = (-jnp.sort(-mass, axis=-1)).reshape(b, hq, tiles, block).sum(-1)",
        "gathered = mass.reshape(b, hq, tiles, block).sum(-1)",
        ("tests/test_adaptive.py",),
        focus="oracle",
    ),
    Mutant(
        "oracle_tiles_past_the_block",
        "minference_jax/recall.py",
        "causal = num_blocks(min(start + block, n), block)",
        "causal = num_blocks(n, block)",
        ("tests/test_adaptive.py",),
        focus="oracle",
    ),
    Mutant(
        "adaptive_vs_always_picks_key_blocks",
        "minference_jax/patterns.py",
        "if isinstance(pattern, AdaptiveVerticalSlash) and pattern.query_aware > 0:",
        "if isinstance(pattern, AdaptiveVerticalSlash):",
        ("tests/test_adaptive.py", "tests/test_dispatch.py"),
        focus="key_tile or default_blocks",
    ),
    Mutant(
        "pallas_f32_not_highest",
        "pallas_kernels/sparse_flash.py",
        "precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,",
        "precision=None,",
        ("tests/test_pallas_kernel.py",),
        focus="gpu_matches_reference and f32",
        gpu_only=True,
    ),
)


def copy_repository(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files (no virtualenvs, caches or build outputs)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def has_gpu() -> bool:
    probe = "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def run_tests(scratch: Path, tests, focus: str | None, timeout: float) -> tuple[bool, float]:
    """(tests passed, seconds) in the scratch copy; stops at the first failure."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    if focus:
        cmd += ["-k", focus]
    env = {**os.environ, "PYTHONPATH": str(scratch)}
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, timeout=timeout)
        passed = done.returncode == 0
    except subprocess.TimeoutExpired:
        passed = False  # a hang counts as caught
    return passed, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="run whole test files, not -k focus")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--skip-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}; known: {[m.name for m in MUTANTS]}")
    gpu = has_gpu()
    rows, bad = [], False
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        scratch = Path(tmp)
        copy_repository(scratch)
        for mutant in mutants:
            focus = None if args.full else mutant.focus
            target = scratch / mutant.path
            source = target.read_text()
            if source.count(mutant.original) != 1:
                rows.append((mutant.name, mutant.tests, "LINE NOT FOUND (update the check)", 0))
                bad = True
                continue
            if mutant.gpu_only and not gpu:
                rows.append((mutant.name, mutant.tests, "GPU only (no GPU here)", 0))
                continue
            if not args.skip_baseline:
                passed, seconds = run_tests(scratch, mutant.tests, focus, args.timeout)
                if not passed:
                    rows.append((mutant.name, mutant.tests, "BASELINE FAILS", seconds))
                    bad = True
                    continue
            target.write_text(source.replace(mutant.original, mutant.mutated))
            try:
                passed, seconds = run_tests(scratch, mutant.tests, focus, args.timeout)
            finally:
                target.write_text(source)
            rows.append((mutant.name, mutant.tests, "NOT CAUGHT" if passed else "caught", seconds))
            bad |= passed
    width = max(len(r[0]) for r in rows)
    print(f"{'mutant':{width}}  {'result':34}  {'seconds':>7}  tests")
    for name, tests, result, seconds in rows:
        print(f"{name:{width}}  {result:34}  {seconds:7.1f}  {' '.join(tests)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
