"""Sequential editing: edits accumulate one request (or one small batch) at a time, never restored."""
