"""INSERT ... ON CONFLICT on SQLite and PostgreSQL.

A SELECT-then-INSERT (or `Session.merge`) lets two writers of the same new key both see "absent"
and the second fail with IntegrityError; ON CONFLICT makes the database arbitrate in one statement.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import Base

# Both dialects spell ON CONFLICT the same way, so only the constructor differs.
_INSERTS: dict[str, Callable[[type[Base]], postgresql.Insert | sqlite.Insert]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


def insert_on_conflict(
    session: Session,
    model: type[Base],
    values: Mapping[str, Any],
    *,
    key: Sequence[str],
    update: Sequence[str] = (),
) -> postgresql.Insert | sqlite.Insert:
    """INSERT `values`; if a row with the same `key` columns exists, set its `update` columns to the
    new values instead (with no `update` columns, leave it alone: the statement then affects 0 rows).

    Python-side `onupdate` defaults do not apply to the SET clause, so such columns (e.g.
    `updated_at`) must be passed in `values` and named in `update`.
    """
    dialect = session.get_bind().dialect.name
    try:
        build = _INSERTS[dialect]
    except KeyError:
        raise NotImplementedError(f"no INSERT ... ON CONFLICT for the {dialect!r} dialect") from None
    statement = build(model).values(**values)
    if not update:
        return statement.on_conflict_do_nothing(index_elements=list(key))
    return statement.on_conflict_do_update(
        index_elements=list(key), set_={column: statement.excluded[column] for column in update}
    )
