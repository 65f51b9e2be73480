"""Long fuzz run: random graphs, random pass orders (Tzer-style) and random recipes, checked after every
pass by tests/fuzz/harness.py; each new kind of failure is minimized (delta debugging: blocks dropped,
dimensions halved while the same pass fails the same check) and saved with its seed and error.

    python -m lowbit.tools.dev.fuzz --minutes 10 --seed 0 --out fuzz-out
    python -m lowbit.tools.dev.fuzz --replay fuzz-out/<failure>/failure.json

Needs a source checkout: the generator and the checks live in tests/fuzz/.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

ROOT = pathlib.Path(__file__).resolve().parents[2]  # tools/dev/fuzz.py -> the checkout


def _fuzz_modules():
    if not (ROOT / "tests" / "fuzz").is_dir():
        raise SystemExit(f"lowbit.tools.dev.fuzz needs a source checkout with tests/fuzz/ (looked in {ROOT})")
    sys.path.insert(0, str(ROOT))
    from tests.fuzz import generator, harness

    return generator, harness


def _check(harness, case: dict, spec) -> None:
    """Run one case (``order`` or ``pipeline``); any exception comes back as a FuzzFailure."""
    try:
        if case["order"] is None:
            harness.check_pipeline(spec, case["check_seed"])
        else:
            harness.check_order(spec, case["order"], case["check_seed"])
    except harness.FuzzFailure:
        raise
    except Exception as error:
        raise harness.FuzzFailure("harness", "crash", f"{type(error).__name__}: {error}") from error


def _fails_alike(harness, case: dict, spec, failure) -> bool:
    try:
        _check(harness, case, spec)
    except harness.FuzzFailure as again:
        return again.signature == failure.signature
    return False


def _minimize_and_save(generator, harness, case: dict, spec, failure, out: pathlib.Path) -> pathlib.Path:
    small = generator.minimize(spec, lambda candidate: _fails_alike(harness, case, candidate, failure))
    original_order = case["order"]
    for index in reversed(range(len(case["order"] or []))):  # then drop the passes it does not need
        shorter = {**case, "order": case["order"][:index] + case["order"][index + 1 :]}
        if shorter["order"] and _fails_alike(harness, shorter, small, failure):
            case = shorter
    try:
        _check(harness, case, small)
        error = str(failure)  # flaky: the minimized graph passed on this run; keep the original error
    except harness.FuzzFailure as again:
        error = str(again)
    folder = out / f"{'-'.join(failure.signature)}-seed{case['seed']}-{case['index']}"
    folder.mkdir(parents=True, exist_ok=True)
    ir.save(generator.build(small), folder / "model.onnx")
    record = {
        **case,
        "error": error,
        "original_error": str(failure),
        "original_order": original_order,
        "spec": small.to_dict(),
        "original_spec": spec.to_dict(),
    }
    (folder / "failure.json").write_text(json.dumps(record, indent=1))
    return folder


def fuzz(minutes: float, seed: int, out: pathlib.Path, max_blocks: int, pipeline_share: float) -> collections.Counter:
    generator, harness = _fuzz_modules()
    counts: collections.Counter = collections.Counter()
    saved: dict[tuple[str, str], pathlib.Path] = {}
    deadline = time.monotonic() + minutes * 60
    with tqdm(unit="graph", desc="fuzz") as progress:
        while time.monotonic() < deadline:
            index = counts["graphs"]
            rng = np.random.default_rng([seed, index])
            spec = generator.random_spec(rng, max_blocks)
            pipeline = rng.random() < pipeline_share
            order = None if pipeline else harness.random_order(rng, int(rng.integers(1, 8)))
            case = {"seed": seed, "index": index, "check_seed": index, "order": order}
            counts["graphs"] += 1
            counts["pipelines" if pipeline else "pass orders"] += 1
            counts["passes run"] += 0 if pipeline else len(order)
            try:
                _check(harness, case, spec)
            except harness.FuzzFailure as failure:
                counts["failures"] += 1
                if failure.signature not in saved:
                    saved[failure.signature] = _minimize_and_save(generator, harness, case, spec, failure, out)
                    tqdm.write(f"new failure {failure.signature}: {str(failure)[:300]} -> {saved[failure.signature]}")
            progress.update()
            progress.set_postfix(failures=counts["failures"], kinds=len(saved))
    counts["distinct failures"] = len(saved)
    return counts


def replay(path: pathlib.Path) -> None:
    """Re-run a saved failure: its ``failure.json``, its folder, or an ``--out`` folder (every failure in it)."""
    generator, harness = _fuzz_modules()
    files = [path] if path.is_file() else sorted(path.glob("failure.json")) or sorted(path.glob("*/failure.json"))
    if not files:
        raise FileNotFoundError(f"no failure.json at {str(path)!r} or in its subfolders")
    for file in files:
        case = json.loads(file.read_text())
        _check(harness, case, generator.Spec.from_dict(case["spec"]))
        print(f"{file}: passes now")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowbit.tools.dev.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("fuzz-out"), help="where minimized failures go"
    )
    parser.add_argument("--max-blocks", type=int, default=12, help="most blocks in one generated graph")
    parser.add_argument("--pipeline-share", type=float, default=0.3, help="share of cases that run lowbit.optimize")
    parser.add_argument(
        "--replay", type=pathlib.Path, help="re-run a saved failure.json (or every one in a folder) instead of fuzzing"
    )
    args = parser.parse_args(argv)
    if args.replay:
        replay(args.replay)
        return
    counts = fuzz(args.minutes, args.seed, args.out, args.max_blocks, args.pipeline_share)
    print("| graphs | pass orders | pipelines | passes run | failures | distinct failures |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        " | ".join(
            [
                "",
                *(
                    str(counts[key])
                    for key in ("graphs", "pass orders", "pipelines", "passes run", "failures", "distinct failures")
                ),
                "",
            ]
        ).strip()
    )


if __name__ == "__main__":
    main()
