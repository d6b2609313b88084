"""The worker's per-user state: the ``user_state`` table values, their decoded cache, the timer
index derived from them, and the checkpoints that write them with the clickstream positions."""
