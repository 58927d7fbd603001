"""The endpoints, as FastAPI routers: :mod:`.openai` (completions and
models), :mod:`.responses` (OpenAI's Responses API), :mod:`.messages`
(Anthropic's Messages API), :mod:`.tokens` (tokenize, detokenize),
:mod:`.cluster` (health, status, joins, metrics)."""
