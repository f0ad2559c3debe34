"""Tool calling: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` (docs/tool_calling.md).

spec.py     the request's tools and choice, checked; the calls a model made
formats.py  how a model family writes calls: its grammar, and the parser that reads them
chat.py     the prompt (through the chat template), the constraint, whole and streamed parsing
"""

from tokenmill.tools.chat import ToolCallStream, ToolTemplate
from tokenmill.tools.spec import FunctionTool, ToolCall, ToolsRequest

__all__ = ["FunctionTool", "ToolCall", "ToolCallStream", "ToolTemplate", "ToolsRequest"]
