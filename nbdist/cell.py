"""The rank side of a ``%%distributed`` cell: run it, hand back the names it assigned.

The magic (``magic.py``, in the kernel) ships a :class:`Cell` and the notebook values
it reads; every rank runs :func:`run_cell`::

    namespace = rank, device, track, ... + the notebook's values
    import the notebook's modules the cell's values come from (their side effects)
    exec the cell, compiled as <nbdist-cell In[N]> (tracebacks show its lines)
    rank 0: the assigned names, as payload.Outputs (each travels on its own)

Ranks import this module, never the magic: it imports nothing of the caller's side.
"""

from __future__ import annotations

import builtins
import importlib
import sys
from dataclasses import dataclass
from typing import Any

from nbdist import payload, runtime

# Given to every rank's namespace, never sent back. The values are each rank's own and
# win over the notebook's (the user is told); a notebook function of the same name as
# a helper (fastai's rank0_first) wins over nbdist's.
RANK_VALUES = ("rank", "local_rank", "world_size", "device")
HELPERS = ("track", "report", "barrier", "is_main", "rank0_first")
PREDEFINED = RANK_VALUES + HELPERS

# A pool rank's namespace kept from cell to cell (``--persist``).
_kept: dict[str, Any] = {}


@dataclass(frozen=True)
class Cell:
    """What every rank needs to run the cell (travels in the payload)."""

    body: str
    filename: str  # "<nbdist-cell In[N]>": what tracebacks show
    text: str  # the whole cell, magic line included, so line numbers match the notebook
    outputs: tuple[str, ...]  # the names rank 0 sends back
    explicit: bool = False  # outputs came from --out: a missing one is worth a warning
    # modules the notebook imported, for their side effects (fastai.distributed patches
    # Learner): those of the packages the cell's values come from are imported on the
    # ranks first; the others are named if the cell then fails for want of an attribute
    imports: tuple[str, ...] = ()
    not_imported: tuple[str, ...] = ()
    persist: bool = False  # a pool's: this rank's namespace lives on for the next cell

    def compile(self):
        return compile_body(self.body, self.filename)


def compile_body(body: str, filename: str):
    """Compile the cell's body with line numbers as the notebook shows them."""
    # the leading newline stands for the magic line; dont_inherit keeps this
    # module's ``from __future__`` flags out of the user's code
    return compile("\n" + body, filename, "exec", dont_inherit=True)


def run_cell(cell: Cell, captured: dict[str, Any]) -> payload.Outputs | None:
    """Run the cell in a fresh namespace (a pool's kept one with ``persist``); on
    rank 0, return what goes back."""
    payload.register_source(cell.filename, cell.text.splitlines(True))
    _import_notebook_modules(cell.imports)
    namespace = _kept if cell.persist else {}
    namespace.update({"__name__": "__main__", "__builtins__": builtins, **predefined(),
                      **captured})
    try:
        exec(cell.compile(), namespace)
    except (AttributeError, NameError) as exc:
        skipped = [m for m in cell.not_imported if m not in sys.modules]
        if skipped:
            exc.add_note(f"[nbdist] the notebook also imported {', '.join(skipped)}, which "
                         f"the ranks did not: if the cell needs what they set up, import "
                         f"them in the cell")
        raise
    if not runtime.is_main():
        return None
    return _collect(namespace, cell)


def _import_notebook_modules(modules: tuple[str, ...]) -> None:
    failed = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # an import can raise anything; the cell may not need it
            failed.append(f"{module} ({type(exc).__name__}: {exc})")
    if failed and runtime.is_main():
        print(f"[nbdist] the notebook's imports {', '.join(failed)} failed on the ranks",
              file=sys.stderr, flush=True)


def predefined() -> dict[str, Any]:
    """The names every rank's namespace starts with: values, not functions, for the
    ranks and the device."""
    return {
        "rank": runtime.rank(), "local_rank": runtime.local_rank(),
        "world_size": runtime.world_size(), "device": runtime.device(),
        "track": runtime.track, "report": runtime.report, "barrier": runtime.barrier,
        "is_main": runtime.is_main, "rank0_first": runtime.rank0_first,
    }


def _collect(namespace: dict[str, Any], cell: Cell) -> payload.Outputs:
    """The output names' values; each travels on its own (see ``payload.Outputs``)."""
    outputs = payload.Outputs()
    for name in cell.outputs:
        if name in namespace:
            outputs.values[name] = namespace[name]
        elif cell.explicit:
            outputs.skipped[name] = "it is not defined on rank 0 after the cell"
    return outputs
