"""Tool calls in a model's output: :mod:`.parser` (the deltas and the
machine that reads calls as the output arrives), one module a family's
syntax (:mod:`.hermes`, :mod:`.llama3`, :mod:`.mistral`, :mod:`.gpt_oss`,
:mod:`.deepseek`, :mod:`.glm`), :mod:`.family` (which one a template
uses), :mod:`.choice` (tools and ``tool_choice``), :mod:`.messages`
(calls and results as templates take them), :mod:`.schema` (arguments
checked), :mod:`.scan` and :mod:`.json_call` (JSON still arriving)."""
