"""Import a script of jobs/ by name, as tests need its functions (jobs/ is not a package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"


def load_job(name: str) -> ModuleType:
    """jobs/<name>.py as a fresh module `job_<name>` (registered in sys.modules: dataclasses look it up there)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", JOBS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
