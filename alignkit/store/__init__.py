"""The label store: prompts, responses, comparisons, leases and votes in SQLite or PostgreSQL.

    store = open_store("labels.db")            # or "postgresql+psycopg://user@host/db"
    item = next_item(store, "alice")           # lease a comparison (None when done)
    submit_vote(store, "alice", item.comparison_id, "a")
    rows = preference_rows("labels.db")        # prompt / chosen / rejected for training
"""

from alignkit.store.db import SCHEMA_VERSION, Store, open_store
from alignkit.store.queue import (Item, Progress, VoteReceipt, next_item, progress, skip, skipped, submit_ranking,
                                  submit_vote, undo_last_vote, unskip)

__all__ = ["SCHEMA_VERSION", "Store", "open_store", "Item", "Progress", "VoteReceipt", "next_item", "progress",
           "skip", "skipped", "submit_ranking", "submit_vote", "undo_last_vote", "unskip"]
