"""``clickhouse-client`` for the README's commands in tests/test_clickhouse.py: the same arguments, run by chdb
(ClickHouse in process) on the database folder in $CHDB_PATH, since no ClickHouse server runs here.

It takes ``--query``/``-q`` (else the statements on standard input, with ``--multiquery``/``-n``), ``--param_NAME=VALUE``,
settings as ``--NAME=VALUE`` (ClickHouse applies them) and ``--format``; ``--host`` names the one ClickHouse there is.
An INSERT ... FORMAT reads its rows from standard input.
With $CLICKHOUSE_FAIL_AFTER=N it inserts the first N rows of the input, then fails (exit 1) without reading the rest:
a consumer that dies in the middle of a batch, having taken part of it.
"""

import os
import re
import sys
from typing import Dict, List, Optional, Tuple

from chdb import session

OPTIONS = ("--query", "-q", "--format", "-f", "--host", "-h", "--port")  # the client's own options that take a value


def parse(args: List[str]) -> Tuple[Optional[str], Dict[str, str], Dict[str, str], str]:
    """The query, its parameters (``--param_NAME=VALUE``), the settings (any other ``--NAME=VALUE``) and the output format."""
    query, params, settings, fmt = None, {}, {}, "TabSeparated"
    position = 0
    while position < len(args):
        name, equals, value = args[position].partition("=")
        if name in OPTIONS and not equals:
            position += 1
            value = args[position]
        if name in ("--query", "-q"):
            query = value
        elif name in ("--format", "-f"):
            fmt = value
        elif name.startswith("--param_"):
            params[name[len("--param_"):]] = value
        elif equals and name not in OPTIONS:
            settings[name[2:]] = value
        position += 1
    return query, params, settings, fmt


def main() -> int:
    query, params, settings, fmt = parse(sys.argv[1:])
    database = session.Session(os.environ["CHDB_PATH"])
    try:
        for name, value in settings.items():
            database.query(f"SET {name} = '{value}'")
        if query is None:  # --multiquery: the statements on standard input
            for statement in re.split(r";[ \t]*(?:\n|$)", sys.stdin.read()):  # a statement ends with ; at the end of a line
                if statement.strip():
                    database.query(statement)
            return 0
        if query.lstrip().upper().startswith("INSERT") and " FORMAT " in query.upper():
            fail_after = os.environ.get("CLICKHOUSE_FAIL_AFTER")
            if fail_after is None:
                database.query(query + "\n" + sys.stdin.read())
                return 0
            taken = [sys.stdin.readline() for _ in range(int(fail_after))]
            database.query(query + "\n" + "".join(taken))
            print("clickhouse-client: connection reset in the middle of the batch", file=sys.stderr)
            return 1
        sys.stdout.write(database.query(query, fmt, params=params).data())
        return 0
    finally:
        database.close()


if __name__ == "__main__":
    sys.exit(main())
