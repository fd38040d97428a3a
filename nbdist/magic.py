"""``%%distributed`` (alias ``%%nbdist``): run a notebook cell on every rank of a DDP job.

::

    %load_ext nbdist

    %%distributed --nprocs 2
    model = DDP(Net().to(device))      # Net, data, ... come from the notebook
    ...
    state = model.module.state_dict()  # and ``state`` is in the notebook afterwards

A thin layer on :func:`nbdist.run_distributed`; the function it ships is
:func:`nbdist.cell.run_cell`, and :mod:`nbdist.scope` says which names travel::

    kernel                                          every rank
    ──────                                          ──────────
    options → run_distributed's arguments
      (bad ones: UsageError, nothing started)
    the cell's names (ast): read / assigned
    capture the notebook globals it reads  ─payload─▶ run_cell: namespace = those globals
                                                        + rank, device, track, ...
                                                      exec the cell as <nbdist-cell In[N]>
                                                      rank 0: the assigned names, on the
                                                        CPU, one file each
    names into the notebook, warn skipped  ◀─result─
    or the rank's exception, shown with the cell's own traceback

Only the kernel imports this module (ranks import ``cell.py``); IPython is imported
when the extension loads, not at the top.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import keyword
import re
import sys
import time
import types
from typing import Any, Iterable

from nbdist import api, payload, runtime
from nbdist.cell import HELPERS, PREDEFINED, RANK_VALUES, Cell, compile_body, run_cell
from nbdist.errors import InvalidArgumentError, NbdistError, PicklingError
from nbdist.plan import plan_launch
from nbdist.pool import Pool, check_options
from nbdist.rankstacks import stacks
from nbdist.scope import names_assigned, names_read
from nbdist.session import SESSION
from nbdist.states import JobState

MAGIC_NAMES = ("distributed", "nbdist")  # "distributed" alone clashes with other packages

# _, __, ___, _i, _ii, _iii, _iN, _N, _ih, _oh, _dh: IPython's output/input history
_IPYTHON_MANAGED = re.compile(r"_{1,3}|_i{1,3}|_i?\d+|_[iod]h")


def load_ipython_extension(ipython) -> None:
    """``%load_ext nbdist``: register ``%%distributed`` and its alias ``%%nbdist``, and
    the line magic ``%distributed start|status|restart|stop`` for a warm pool."""
    magic = _make_magic(ipython)
    pool_magic = _make_pool_magic()
    for name in MAGIC_NAMES:
        ipython.register_magic_function(magic, "cell", name)
        ipython.register_magic_function(pool_magic, "line", name)


def _make_pool_magic():
    from IPython.core.error import UsageError
    from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

    @magic_arguments("%distributed")
    @argument("action", choices=("start", "status", "restart", "stop", "stacks"))
    @argument("--nprocs", type=int, metavar="N", help="number of ranks (start)")
    @argument("--gpus", metavar="2|0,1", help="GPUs, one rank each (start)")
    @argument("--backend", help="process group backend (start)")
    @argument("--persist", action="store_true",
              help="each rank keeps its cell namespace between cells (start)")
    @argument("--debug", action="store_true",
              help="torch's collective checks, TORCH_DISTRIBUTED_DEBUG=DETAIL (start)")
    @_where_arguments
    def distributed(line: str) -> None:
        """A warm pool for this kernel: ``%%distributed`` cells then run on its ranks.

        ``%distributed start --nprocs 2 [--persist]`` starts it, ``status`` says what it
        holds, ``restart`` starts it anew (rank state is lost), ``stop`` ends it,
        ``stacks`` shows where each rank is (its Python stack).
        """
        pool = SESSION.kernel_pool
        usage = _Usage(distributed)
        try:
            args = parse_argstring(distributed, line)
        except (UsageError, ValueError) as exc:
            raise UsageError(f"{usage}%distributed: {exc}") from None
        try:
            shape = {"nprocs": args.nprocs, "gpus": args.gpus, "backend": args.backend,
                     **_where(args)}
        except ValueError as exc:
            raise UsageError(f"{usage}%distributed: {exc}") from None
        if args.action == "start" and pool is not None:
            raise UsageError(f"%distributed start: a pool is already up ({pool!r}); "
                             f"use %distributed restart or stop")
        if args.action in ("start", "restart"):
            shape["debug"] = args.debug
            options = ({**pool.options, "persist": pool.persist}
                       if args.action == "restart" and pool is not None
                       and not any(shape.values()) and not args.persist
                       else {**shape, "persist": args.persist})
            if pool is not None:
                pool.close()
            _start_pool(options, usage)
        elif args.action == "stop":
            if pool is None:
                print("[nbdist] no pool to stop: %%distributed cells run as cold jobs")
            else:
                pool.close()
                print(f"[nbdist] pool stopped after {pool.tasks} task(s): its ranks are "
                      f"gone; %%distributed cells run as cold jobs again")
        elif args.action == "stacks":
            print(stacks())
        else:
            print(_describe(pool))

    return distributed


class _Usage:
    """A magic's usage line, formatted only when an error shows it (argparse takes
    longer to format it than a warm cell takes to run)."""

    def __init__(self, magic):
        self.magic = magic

    def __str__(self) -> str:
        return "usage: " + self.magic.parser.format_usage().removeprefix("::\n\n  ")

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _start_pool(options: dict[str, Any], usage: str) -> None:
    """A pool for this kernel's cells, its ranks joined before the cell returns."""
    from IPython.core.error import UsageError

    began = time.monotonic()
    try:
        pool = Pool(**options)
    except InvalidArgumentError as exc:
        raise UsageError(f"{usage}%distributed: {_as_options(str(exc))}") from None
    try:
        pool.ready()
    except BaseException:  # it could not start, or stop was pressed: nothing is left
        pool.close()
        raise
    SESSION.kernel_pool = pool
    hosts = f" on {pool.plan.nhosts} hosts" if pool.plan.nhosts > 1 else ""
    pids = ", ".join(str(r["pid"]) for r in pool.status()["ranks"])
    print(f"[nbdist] pool ready in {time.monotonic() - began:.1f} s: {pool.world_size} ranks"
          f"{hosts} (pids {pids}), {pool.plan.backend}{', persist' if pool.persist else ''};"
          f" %%distributed cells run on it")


def _describe(pool: Pool | None) -> str:
    if pool is None:
        return "[nbdist] no pool (%distributed start --nprocs N starts one)"
    status = pool.status()
    ranks = ", ".join(f"rank {r['rank']} {r['state']} (pid {r['pid']}"
                      + (f" on {r['host']})" if pool.plan.remote and r["host"] else ")")
                      for r in status["ranks"])
    devices = status["device"] + (f" {status['visible_devices']}" if status["visible_devices"] else "")
    return (f"[nbdist] pool {'up' if status['alive'] else 'down'}: {status['world_size']} ranks "
            f"on {devices}, {status['backend']}, {status['tasks']} tasks run, idle "
            f"{status['idle_seconds']:g}s{', persist' if status['persist'] else ''}\n"
            f"  {ranks}")


def _make_magic(shell):
    # IPython is imported here, when the extension loads, not by ``import nbdist``
    from IPython.core.error import UsageError
    from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

    @magic_arguments("%distributed")  # IPython's usage line adds the other %
    @argument("--nprocs", type=int, metavar="N",
              help="number of processes (default: one per GPU, or 2 on the CPU)")
    @argument("--gpus", metavar="2|0,1",
              help="a GPU count or device ids; one process per GPU, nccl backend")
    @argument("--backend", help="process group backend (default: nccl on GPUs, else gloo)")
    @argument("--timeout", type=float, metavar="SECONDS",
              help="kill every rank and raise JobTimeoutError past this many seconds")
    @argument("--out", metavar="a,b",
              help="only these names come back (default: every name the cell assigns)")
    @argument("--all-ranks", action="store_true",
              help="stream every rank's output, prefixed [rank N] (default: rank 0's)")
    @argument("--quiet", action="store_true", help="no live output")
    @argument("--stall-warning", type=float, metavar="SECONDS",
              help="warn once when no rank progressed this long and one waits in a "
                   "collective (default 120; 0: never)")
    @argument("--debug", action="store_true",
              help="torch's collective checks (TORCH_DISTRIBUTED_DEBUG=DETAIL)")
    @argument("--fresh", action="store_true",
              help="a cold job even while a pool is up (%%distributed start)")
    @_where_arguments
    def distributed(line: str, cell: str) -> None:
        """Run this cell on every rank of a DDP job; the names it assigns come back.

        The notebook variables the cell reads are sent along; ``rank``,
        ``local_rank``, ``world_size``, ``device`` and nbdist's ``track``, ``report``,
        ``barrier``, ``is_main``, ``rank0_first`` are predefined. Names the cell
        assigns come back from rank 0 (tensors on the CPU, DDP unwrapped)::

            %%distributed --nprocs 2
            model = DDP(Net().to(device))
            for epoch in track(range(3), desc="epoch"):
                ...
            state = model.module.state_dict()
        """
        usage = _Usage(distributed)
        try:
            args = parse_argstring(distributed, line)
        except (UsageError, ValueError) as exc:  # ValueError: an unclosed quote
            raise UsageError(f"{usage}%%distributed: {exc}") from None
        try:
            _run_magic(shell, args, line, cell, usage=usage)
        except SyntaxError as exc:
            if not getattr(exc, "nbdist_cell", False):
                raise
            # IPython shows a SyntaxError with every frame it went through (it ignores
            # _render_traceback_ for them): keep only this one, not nbdist's insides
            raise exc.with_traceback(None) from None

    return distributed


def _run_magic(shell, args, line: str, body: str, *, usage: str) -> None:
    """The magic's work, once its options are parsed (``args``)."""
    options = _job_options(args, usage)
    pool = SESSION.kernel_pool if not args.fresh else None
    if pool is not None:
        _check_pool_options(pool, options, usage)
    outputs = _parse_out(args.out, usage) if args.out is not None else None
    cell = _prepare(shell, line, body, outputs)
    reads = names_read(body)
    kept = pool.kept_names if pool is not None and pool.persist else set()
    captured = _capture(shell, [n for n in reads if n not in kept])  # the ranks' own win
    _say_shadowed(shell, reads)
    cell = dataclasses.replace(cell, persist=pool is not None and pool.persist,
                               **_notebook_imports(shell, captured))
    result = _launch(shell, cell, captured, options, pool)
    if pool is not None and pool.persist and pool.alive:
        pool.kept_names.update(names_assigned(body))
    if result is None:  # the cell called sys.exit() on rank 0
        return
    shell.user_ns.update(result.values)
    for name, why in result.skipped.items():
        print(f"[nbdist] {name!r} did not come back: {why}. The other names did; return "
              f"plain data (tensors, state_dicts, numbers) or pick names with --out.",
              file=sys.stderr)
    if result.values and not args.quiet:
        print(f"[nbdist] from rank 0: {', '.join(result.values)}")


def _job_options(args, usage: str) -> dict[str, Any]:
    """run_distributed's keyword arguments; checked now, so nothing starts if one is bad."""
    from IPython.core.error import UsageError

    try:
        shape = {"nprocs": args.nprocs, "gpus": args.gpus, "backend": args.backend,
                 "timeout": args.timeout, **_where(args)}
        plan_launch(init_timeout=api.DEFAULT_INIT_TIMEOUT, **shape)
    except ValueError as exc:  # InvalidArgumentError, or options that do not go together
        raise UsageError(f"{usage}%%distributed: {_as_options(str(exc))}") from None
    if args.stall_warning is not None and args.stall_warning < 0:
        raise UsageError(f"{usage}%%distributed: --stall-warning takes seconds (0: never), "
                         f"got {args.stall_warning:g}")
    stall = {None: api.DEFAULT_STALL_WARNING, 0: None}.get(args.stall_warning,
                                                           args.stall_warning)
    return {**shape, "display": "none" if args.quiet else "auto",
            "all_ranks": args.all_ranks, "stall_warning": stall, "debug": args.debug}


_KEYWORD = re.compile(r"\b(nprocs|gpus|backend|timeout|init_timeout|hosts)=(?:'([^']*)'|([^\s,;)]+))")


def _where_arguments(magic):
    """The options that say which machines run the ranks (both magics take them)."""
    from IPython.core.magic_arguments import argument

    for option in reversed((
        argument("--hosts", metavar="a,b",
                 help="run on these hosts over ssh; --nprocs/--gpus count per host"),
        argument("--ssh-options", metavar="'-F FILE'",
                 help="extra ssh arguments (default: $NBDIST_SSH_OPTIONS)"),
        argument("--slurm", action="store_true",
                 help="run as a Slurm job step (srun), in this allocation or a new one"),
        argument("--nodes", type=int, metavar="N", help="Slurm nodes (with --slurm)"),
        argument("--partition", metavar="P", help="Slurm partition (with --slurm)"),
        argument("--time", metavar="T", help="Slurm time limit (with --slurm)"),
        argument("--account", metavar="A", help="Slurm account (with --slurm)"),
        argument("--slurm-args", metavar="'...'",
                 help="more salloc arguments (with --slurm)"),
    )):
        magic = option(magic)
    return magic


def _unquoted(value: str) -> str:
    """IPython keeps an option's quotes: ``--ssh-options '-F cfg'`` gives "'-F cfg'"."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _where(args) -> dict[str, Any]:
    """hosts= / ssh_options= / slurm= from the magic's options."""
    import shlex

    slurm_only = {"nodes": args.nodes, "partition": args.partition, "time": args.time,
                  "account": args.account}
    if not args.slurm and (any(v is not None for v in slurm_only.values()) or args.slurm_args):
        raise ValueError("--nodes, --partition, --time, --account and --slurm-args go "
                         "with --slurm")
    slurm = None
    if args.slurm:
        slurm = {k: v for k, v in slurm_only.items() if v is not None}
        if args.slurm_args:
            slurm["args"] = shlex.split(_unquoted(args.slurm_args))
    ssh_options = (shlex.split(_unquoted(args.ssh_options)) if args.ssh_options is not None
                   else None)
    if ssh_options is not None and not args.hosts:
        raise ValueError("--ssh-options goes with --hosts")
    return {"hosts": args.hosts, "ssh_options": ssh_options, "slurm": slurm}


def _as_options(message: str) -> str:
    """run_distributed's words in a magic's: ``use nprocs=2`` → ``use --nprocs 2``."""
    return _KEYWORD.sub(lambda m: f"--{m[1].replace('_', '-')} {m[2] or m[3]}", message)


def _prepare(shell, line: str, body: str, outputs: list[str] | None) -> Cell:
    """Compile the cell here first (a SyntaxError shows before anything starts)."""
    filename = f"<nbdist-cell {_this_cell(shell)}>"
    text = f"%%{MAGIC_NAMES[0]} {line}".rstrip() + "\n" + body
    # registered here too: for the SyntaxError's line, and for functions the cell
    # defines, whose frames point at this cell once they are back in the notebook
    payload.register_source(filename, text.splitlines(True))
    try:
        compile_body(body, filename)
    except SyntaxError as exc:
        if re.search(r"(?m)^\s*[%!]", body):
            exc.add_note("[nbdist] the ranks run plain Python: IPython's %magics and "
                         "!commands do not work inside a %%distributed cell")
        exc.nbdist_cell = True  # type: ignore[attr-defined]
        raise
    if outputs is None:
        outputs = [n for n in names_assigned(body)
                   if n not in PREDEFINED and not _IPYTHON_MANAGED.fullmatch(n)]
        return Cell(body, filename, text, tuple(outputs))
    return Cell(body, filename, text, tuple(outputs), explicit=True)


def _this_cell(shell) -> str:
    """``In[N]`` of the cell running now, as IPython names it in its tracebacks.

    ``shell.execution_count`` is not it: IPython 9 counts the next cell already.
    """
    name_of = getattr(shell.compile, "format_code_name", None)  # IPython >= 8
    frame = sys._getframe(1)
    while name_of is not None and frame is not None:
        named = name_of(frame.f_code.co_filename)  # the cell calling run_cell_magic
        if named is not None:
            return named[1]
        frame = frame.f_back
    return f"In[{shell.execution_count}]"


def _check_pool_options(pool: Pool, options: dict[str, Any], usage: str) -> None:
    from IPython.core.error import UsageError

    try:
        check_options(pool, nprocs=options["nprocs"], gpus=options["gpus"],
                      backend=options["backend"], hosts=options["hosts"],
                      slurm=options["slurm"])
        if options["debug"] and not pool.options["debug"]:
            raise InvalidArgumentError("the pool runs without torch's collective checks "
                                       "(%distributed start --debug)")
    except InvalidArgumentError as exc:
        raise UsageError(f"{usage}%%distributed: {exc}: add --fresh for a cold job of "
                         f"that shape, or %distributed restart with those options") from None


def _launch(shell, cell: Cell, captured: dict[str, Any], options: dict[str, Any],
            pool: Pool | None = None):
    """run_distributed (or the pool's run), with its errors made to look like the cell's."""
    try:
        if pool is not None:
            task = {k: v for k, v in options.items()
                    if k not in ("nprocs", "gpus", "backend", "debug", "hosts",
                                 "ssh_options", "slurm")}
            return pool.run(run_cell, cell, captured, **task)
        return api.run_distributed(run_cell, cell, captured, **options)
    except PicklingError as exc:
        if not hasattr(exc, "nbdist_rank"):  # packing failed here: name the variable
            raise _unpicklable_global(captured, exc) from None
        exc._render_traceback_ = _Rendered(_remote_lines(exc, shell))
        raise
    except KeyboardInterrupt as exc:
        job = api.last_job()
        interrupted = job is not None and job.status == JobState.INTERRUPTED
        logs = f" (logs in {job.dir})" if interrupted else ""
        notes = [n for n in getattr(exc, "__notes__", ()) if n.startswith("[nbdist]")]
        exc._render_traceback_ = _Rendered([
            f"KeyboardInterrupt: the %%distributed cell was interrupted; every rank was "
            f"stopped{logs}", *notes])
        raise
    except BaseException as exc:
        if hasattr(exc, "nbdist_rank"):
            exc._render_traceback_ = _Rendered(_remote_lines(exc, shell))
        elif isinstance(exc, NbdistError):  # timeouts, crashes: the message says it all
            exc._render_traceback_ = _Rendered(_local_lines(exc))
        raise


def _capture(shell, names: Iterable[str]) -> dict[str, Any]:
    """The notebook's values of ``names``, leaving out IPython's own, the ranks' own
    values and nbdist's helpers (a notebook function named like a helper is kept)."""
    hidden = shell.user_ns_hidden
    missing = object()
    captured = {}
    for name in names:
        value = shell.user_ns.get(name, missing)
        if (value is missing or name in RANK_VALUES or _IPYTHON_MANAGED.fullmatch(name)
                or hidden.get(name, missing) is value
                or (name in HELPERS and value is getattr(runtime, name))
                or (name.startswith("__") and name.endswith("__"))):
            continue
        captured[name] = value
    return captured


def _say_shadowed(shell, reads: Iterable[str]) -> None:
    """Tell the user when the cell's ``device`` (``rank``...) is not the notebook's."""
    shadowed = [name for name in reads if name in RANK_VALUES and name in shell.user_ns]
    if shadowed:
        print(f"[nbdist] in the cell, {', '.join(shadowed)} are each rank's own, not the "
              f"notebook's variables of that name (rename those to use them on the ranks)",
              file=sys.stderr)


def _notebook_imports(shell, captured: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The modules the notebook's cells imported, split by whether the ranks import
    them before the cell: those of a package that the cell's values come from."""
    imported: dict[str, None] = {}
    for source in shell.user_ns.get("In", ()):
        imported.update(dict.fromkeys(_imports_of(source)))
    used = {_package_of(value) for value in captured.values()} - {None, "__main__"}
    loaded = [m for m in imported if m in sys.modules]
    return {"imports": tuple(m for m in loaded if m.partition(".")[0] in used),
            "not_imported": tuple(m for m in loaded if m.partition(".")[0] not in used)}


@functools.lru_cache(maxsize=4096)
def _imports_of(source: str) -> tuple[str, ...]:
    """The modules a cell's source imports (absolute imports); each cell is parsed once,
    not at every %%distributed cell of a long notebook."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ()
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append(node.module)
    return tuple(found)


def _package_of(value: Any) -> str | None:
    module = (value.__name__ if isinstance(value, types.ModuleType)
              else getattr(value, "__module__", None) or type(value).__module__)
    return module.partition(".")[0] if isinstance(module, str) else None


def _parse_out(text: str, usage: str) -> list[str]:
    from IPython.core.error import UsageError

    names = [n.strip() for n in text.strip("'\"").split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier() or keyword.iskeyword(n)]
    if bad or not names:
        raise UsageError(f"{usage}%%distributed: --out takes variable names separated "
                         f"by commas (--out state,losses), got {text!r}")
    return names


def _unpicklable_global(captured: dict[str, Any], cause: PicklingError) -> PicklingError:
    culprit = payload.find_unpicklable(captured.items())
    if culprit is None:
        return cause
    name, value, exc = culprit
    error = PicklingError(
        f"the notebook variable {name} (a {type(value).__name__}) cannot be sent to the "
        f"ranks: {type(exc).__name__}: {exc}. Create it inside the cell instead (every "
        f"rank then makes its own), or send what it is built from. Nothing was started.",
        name=name.split(" ")[0])
    error._render_traceback_ = _Rendered(_local_lines(error))
    return error


class _Rendered:
    """What IPython shows for an exception instead of its local traceback (IPython
    calls ``exc._render_traceback_()``)."""

    def __init__(self, lines: list[str]):
        self.lines = lines

    def __call__(self) -> list[str]:
        return list(self.lines)


def _local_lines(exc: BaseException) -> list[str]:
    return [f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", ())]


def _remote_lines(exc: BaseException, shell) -> list[str]:
    """The rank's traceback from the cell's first line down, then nbdist's notes."""
    rank = exc.nbdist_rank  # type: ignore[attr-defined]
    text = _from_the_cell(exc.nbdist_traceback)  # type: ignore[attr-defined]
    lines = []
    for line in text.rstrip("\n").split("\n"):
        if line == "Traceback (most recent call last):":
            line = f"Traceback on rank {rank} (most recent call last):"
        lines.append(_name_notebook_cell(line, shell))
    lines += [n for n in getattr(exc, "__notes__", ()) if n.startswith("[nbdist]")
              and n not in text]
    return lines


_FRAME = re.compile(r'  File "(?P<file>[^"]+)", line (?P<line>\d+)')
_CELL_FRAME = re.compile(r'  File "<nbdist-cell In\[\d+\]>"')


def _from_the_cell(tb: str) -> str:
    """Drop the frames above the cell's (nbdist's worker) from each traceback section."""
    sections = re.split(r"(?m)^(?=Traceback \(most recent call last\):$)", tb)
    kept = []
    for section in sections:
        lines = section.split("\n")
        first = next((i for i, l in enumerate(lines) if _CELL_FRAME.match(l)), None)
        if lines[0].startswith("Traceback") and first is not None:
            lines = lines[:1] + lines[first:]
        kept.append("\n".join(lines))
    return "".join(kept)


def _name_notebook_cell(line: str, shell) -> str:
    """``File "/tmp/ipykernel_1/2.py", line 3`` → ``Cell In[4], line 3``, as IPython says."""
    match = _FRAME.match(line)
    cell_name = getattr(shell.compile, "format_code_name", None)  # IPython >= 8
    if match and cell_name is not None:
        named = cell_name(match["file"])
        if named is not None:
            return f"  {named[0]} {named[1]}, line {match['line']}{line[match.end():]}"
    return line
