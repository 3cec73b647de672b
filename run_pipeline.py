"""Run every pipeline step, in order, on one dataset (default: the bundled fridgeObjects sample).

Steps: 1_prepareData, 2_refineDNN, 3_featurizeImages, 4_trainSvm, 5_evaluate. Step 0 (download) is left out:
the bundled sample needs no network. Every --set override is passed to every step. Stops at the first step
that fails, with that step's exit status.
"""
import subprocess
import sys
import time
from pathlib import Path

import helpers

STEPS = ["1_prepareData.py", "2_refineDNN.py", "3_featurizeImages.py", "4_trainSvm.py", "5_evaluate.py"]


def main(args, P):
    here = Path(__file__).resolve().parent
    steps = [s for s in STEPS if (here / s).exists()]
    overrides = [arg for text in args.overrides for arg in ("--set", text)]
    start = time.perf_counter()
    for n, step in enumerate(steps, 1):
        print(f"\n=== [{n}/{len(steps)}] {step} ===", flush=True)
        status = subprocess.run([sys.executable, str(here / step), *overrides]).returncode
        if status != 0:
            raise SystemExit(f"{step} failed with exit status {status}; the steps after it did not run")
    print(f"\nran {len(steps)} steps on '{P.datasetName}' in {(time.perf_counter() - start) / 60:.1f} min; "
          f"results in {P.resultsDir}")


if __name__ == "__main__":
    helpers.run(main, __doc__)
