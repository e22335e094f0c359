"""A gateway node, as a process of its own, for tests/test_session_nodes.py.

    python -m tests.session_node URL NODE LEASE_SECONDS

It acquires its share of the sessions, writes each one's ``creds`` (its
own name) under its ownership and renews the lease, in a loop, and prints a
JSON line for what happens: ``{"acquired": [...]}``, ``{"lost": id}``.
The key comes from ZAPHUB_AUTH_KEYS, as on a real node.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta

from sqlalchemy.orm import Session

import zaphub_db
from zaphub_db.crypto import Keyring
from zaphub_db.errors import OwnershipLostError, TransientError
from zaphub_db.repositories import auth_state, ownership


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    url, node, lease_seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    lease = timedelta(seconds=lease_seconds)
    keyring = Keyring.from_env()
    engine = zaphub_db.create_engine(url)
    held: dict[str, ownership.Ownership] = {}
    say(started=node)
    while True:
        try:
            with Session(engine) as db:
                taken = ownership.acquire_sessions(db, node=node, limit=1000, lease=lease)
                db.commit()
            if taken:
                held.update({str(o.session_id): o for o in taken})
                say(acquired=[str(o.session_id) for o in taken])
            for session_id, owned in list(held.items()):
                with Session(engine) as db:
                    try:
                        auth_state.set_auth_values(
                            db,
                            keyring,
                            owned.session_id,
                            {"creds": {"": node.encode()}},
                            ownership=owned,
                        )
                        ownership.renew_session(db, owned, lease=lease)
                        db.commit()
                    except OwnershipLostError:
                        db.rollback()
                        del held[session_id]
                        say(lost=session_id)
        except TransientError as exc:
            say(transient=str(exc))
        time.sleep(lease_seconds / 8)


if __name__ == "__main__":
    main()
