"""`torch.export` programs (`.pt2`) as architectures: any PyTorch model, loaded without running its code.

load.py is the entry point (`load_program`, `inspect_program`) and says, step by step, how torch's own
loader would run code from a file and what is done instead; archive.py, pickle_scan.py,
expressions.py, graph_rules.py, shapes.py and payload.py are the checks; conversions.py and
trainable.py turn the graph into a trainable module; export.py writes one (`save_program`).
"""

from rigl_core.models.program.archive import ArchiveLimits
from rigl_core.models.program.errors import ProgramError
from rigl_core.models.program.export import save_program
from rigl_core.models.program.load import ProgramSummary, inspect_program, load_program
from rigl_core.models.program.trainable import ProgramModule

__all__ = ["ArchiveLimits", "ProgramError", "ProgramModule", "ProgramSummary", "inspect_program", "load_program",
           "save_program"]
