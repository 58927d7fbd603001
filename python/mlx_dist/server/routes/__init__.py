"""The endpoints, as FastAPI routers: :mod:`.openai` (completions and
models), :mod:`.tokens` (tokenize, detokenize), :mod:`.cluster` (health,
status, joins, metrics)."""
