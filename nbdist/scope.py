"""Which names a cell reads from the notebook and which it assigns (pure AST).

The magic ships the notebook values of :func:`names_read` and brings back those of
:func:`names_assigned`, following Python's scoping: a name bound in a function,
class body or comprehension is local to it; what such a scope reads from outside
counts as read by the cell.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Iterable

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
           ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
_TRIES = (ast.Try, getattr(ast, "TryStar", ast.Try))


@dataclass
class _Uses:
    reads: dict[str, None] = field(default_factory=dict)  # ordered sets
    binds: dict[str, None] = field(default_factory=dict)
    declared: set[str] = field(default_factory=set)  # global / nonlocal


def names_read(source: str) -> list[str]:
    """Names the cell may look up in the notebook: read before the cell binds them.

    Errs on the side of reading more (a name bound in only one branch of an ``if``
    still counts as read afterwards): shipping a value the cell overwrites costs a
    little time; not shipping one it needs would be a NameError on every rank.
    """
    return list(_free_in_block(ast.parse(source).body, set()))


def names_assigned(source: str) -> list[str]:
    """Names the cell binds at its top level (``global`` ones in its functions too)."""
    tree = ast.parse(source)
    names = dict(_scan(tree.body).binds)
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            names.update(dict.fromkeys(node.names))
    return list(names)


def _free_in_block(stmts: list[ast.stmt], bound: set[str]) -> dict[str, None]:
    """Names ``stmts`` read that are not certainly bound by then; adds what they bind
    for certain to ``bound``."""
    free: dict[str, None] = {}

    def read(uses: _Uses) -> None:
        free.update((n, None) for n in uses.reads if n not in bound)

    for stmt in stmts:
        if isinstance(stmt, (ast.For, ast.AsyncFor)):
            read(_scan([stmt.iter, stmt.target]))
            inner = bound | set(_scan([stmt.target]).binds)
            free.update(_free_in_block(stmt.body, set(inner)))
            free.update(_free_in_block(stmt.orelse, set(inner)))
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            items = _scan(stmt.items)
            read(items)
            bound |= set(items.binds)
            # the body runs to its end or the cell fails: what it binds stays bound
            free.update(_free_in_block(stmt.body, bound))
        elif isinstance(stmt, (ast.If, ast.While)):
            read(_scan([stmt.test]))
            for block in (stmt.body, stmt.orelse):
                free.update(_free_in_block(block, set(bound)))
        elif isinstance(stmt, _TRIES):
            for handler in stmt.handlers:
                read(_scan([handler.type] if handler.type else []))
            for block in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse,
                          stmt.finalbody):
                free.update(_free_in_block(block, set(bound)))
        elif isinstance(stmt, ast.Match):
            read(_scan([stmt.subject]))
            for case in stmt.cases:
                header = _scan([case.pattern] + ([case.guard] if case.guard else []))
                read(header)
                free.update(_free_in_block(case.body, bound | set(header.binds)))
        else:
            uses = _scan([stmt])
            read(uses)
            bound |= set(uses.binds)
    return free


def _scan(nodes: Iterable[ast.AST], uses: _Uses | None = None) -> _Uses:
    """Names read and bound by ``nodes`` in their own scope. A nested scope (def,
    lambda, class, comprehension) contributes the names it looks up outside itself."""
    uses = uses if uses is not None else _Uses()
    for node in nodes:
        _visit(node, uses)
    return uses


def _visit(node: ast.AST, uses: _Uses) -> None:
    if isinstance(node, _SCOPES):
        _scan(_evaluated_outside(node), uses)
        uses.reads.update(dict.fromkeys(_free_names(node)))
        if hasattr(node, "name"):
            uses.binds[node.name] = None
        return
    if isinstance(node, ast.Name):
        (uses.binds if isinstance(node.ctx, ast.Store) else uses.reads)[node.id] = None
    elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
        uses.reads[node.target.id] = None  # x += 1 reads x first
    elif isinstance(node, (ast.Global, ast.Nonlocal)):
        uses.declared.update(node.names)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
        for alias in node.names:
            if alias.name != "*":
                uses.binds[alias.asname or alias.name.partition(".")[0]] = None
    elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
        uses.binds[node.name] = None
    elif isinstance(node, ast.MatchMapping) and node.rest:
        uses.binds[node.rest] = None
    for child in ast.iter_child_nodes(node):
        _visit(child, uses)


def _evaluated_outside(scope: ast.AST) -> list[ast.AST]:
    """Parts of a scope's header that run in the enclosing scope (decorators, defaults)."""
    if isinstance(scope, ast.ClassDef):
        return [*scope.decorator_list, *scope.bases, *scope.keywords]
    if isinstance(scope, _FUNCTIONS):
        args = scope.args
        parts = [*args.defaults, *(d for d in args.kw_defaults if d is not None)]
        if not isinstance(scope, ast.Lambda):
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg,
                     args.kwarg]
            parts += scope.decorator_list
            parts += [a.annotation for a in every if a is not None and a.annotation]
            parts += [scope.returns] if scope.returns else []
        return parts
    return [scope.generators[0].iter]  # a comprehension


def _free_names(scope: ast.AST) -> list[str]:
    """Names a nested scope looks up outside itself."""
    inner = _Uses()
    params: set[str] = set()
    if isinstance(scope, _FUNCTIONS):
        args = scope.args
        params = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs,
                                  args.vararg, args.kwarg) if a is not None}
        _scan(scope.body if isinstance(scope.body, list) else [scope.body], inner)
    elif isinstance(scope, ast.ClassDef):
        _scan(scope.body, inner)
        # a class body's own names are invisible to its methods; count them all as reads
        return list(inner.reads)
    else:
        results = [scope.key, scope.value] if isinstance(scope, ast.DictComp) else [scope.elt]
        gens = scope.generators
        _scan([*results, *(g.target for g in gens), *(i for g in gens for i in g.ifs),
               *(g.iter for g in gens[1:])], inner)
    local = (params | set(inner.binds)) - inner.declared
    return [name for name in inner.reads if name not in local]
