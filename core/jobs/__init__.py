"""Jobs: creation and idempotency (creation), the state machine (states), one attempt's run
(runner), fair scheduling, fitting before queueing, phases and the training-worker registry.
"""
