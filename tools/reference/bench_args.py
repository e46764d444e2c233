"""The command-line options shared by bench.py (PyTorch side) and tools/bench_compare.py (both sides):
one definition, so the two always accept the same workload settings. Standard library only."""
import os
import tempfile


def add_workload_args(ap, runs):
    """Adds --model-dir, --runs (default `runs`), --threads, --size, --steps and --only to `ap`."""
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "omnigen_bench_M"))
    ap.add_argument("--runs", type=int, default=runs)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", default=None, help="comma-separated workloads (gemm, transformer_forward, ...)")
