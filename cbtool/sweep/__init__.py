"""Sweeps: the same fine-tune and evaluation for several CB variants, positions, layer sets and seeds, with a
summary that says whether CB helps beyond seed noise (``cbtool sweep``).

``plan`` is the grid, the run names and folders and ``sweep.json``; ``start`` builds and checks a plan from
finetune's options and runs it; ``runner`` runs one run (finetune, then eval) in this process or the runs in
subprocesses (``--devices``, ``--torchrun``); ``summary`` holds the statistics and ``render`` the table and plot.
"""

from cbtool.sweep.plan import Cell, RunSpec, SweepPlan, read_plan
from cbtool.sweep.start import check_plan, make_plan, run_sweep, write_summary

__all__ = ["Cell", "RunSpec", "SweepPlan", "check_plan", "make_plan", "read_plan", "run_sweep", "write_summary"]
