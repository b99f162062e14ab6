"""``clickhouse-client`` for the README's commands in tests/test_clickhouse.py: the same arguments, run by chdb
(ClickHouse in process) on the database folder in $CHDB_PATH, since no ClickHouse server runs here.

It takes ``--query``/``-q`` (else the statements on standard input, with ``--multiquery``/``-n``), ``--param_NAME=VALUE``
and ``--format``; ``--host`` names the one ClickHouse there is. An INSERT ... FORMAT reads its rows from standard input.
With $CLICKHOUSE_FAIL_AFTER=N it inserts the first N rows of the input, then fails (exit 1) without reading the rest:
a consumer that dies in the middle of a batch, having taken part of it.
"""

import os
import re
import sys
from typing import Dict, List, Optional, Tuple

from chdb import session


def parse(args: List[str]) -> Tuple[Optional[str], Dict[str, str], str]:
    query, params, fmt = None, {}, "TabSeparated"
    position = 0
    while position < len(args):
        name, _, value = args[position].partition("=")
        takes_value = name in ("--query", "-q", "--format", "-f", "--host", "-h", "--port") and not value
        if takes_value:
            position += 1
            value = args[position]
        if name in ("--query", "-q"):
            query = value
        elif name in ("--format", "-f"):
            fmt = value
        elif name.startswith("--param_"):
            params[name[len("--param_"):]] = value
        position += 1
    return query, params, fmt


def main() -> int:
    query, params, fmt = parse(sys.argv[1:])
    database = session.Session(os.environ["CHDB_PATH"])
    try:
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
