"""speedloop's experiment engine: workspace, runner, judge, ledger and command line."""

import os

# One BLAS thread in the engine, set before numpy loads: OpenBLAS's fork handler, run when
# one thread starts a child process while another is in a matrix product (the judge's
# calibration, the sweep's TPE), was seen to hang the engine for good. The engine's
# products are small; its children set their own threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
