#!/usr/bin/env python3
"""Hosts a LangChain agent as a Switchyard process agent (docs/agent-protocol.md).

    python3 langchain_adapter.py MODULE:FACTORY

FACTORY() must return a LangChain Runnable that takes a list of chat messages: a chat model
(ChatOpenAI, ChatAnthropic, ...), a chain ending in one, or a LangGraph graph compiled to a
Runnable. Each turn streams the Runnable's output as deltas; chunks may be message chunks
(their .content is sent) or plain strings. Usage is read from usage_metadata when the model
reports it. Reset builds a fresh Runnable, so no state of one session leaks into the next.

Requires langchain-core (pip install langchain-core) and whatever the factory's model needs.
"""

import importlib
import json
import sys
import traceback

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage


def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def load_factory(spec):
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise SystemExit(f"langchain_adapter: expected MODULE:FACTORY, got {spec!r}")
    return getattr(importlib.import_module(module_name), attribute)


def to_langchain(context):
    messages = []
    for message in context:
        role, content = message.get("role"), message.get("content", "")
        if role == "system":
            messages.append(SystemMessage(content=content))
        elif role == "assistant":
            messages.append(AIMessage(content=content))
        else:  # user, and tool results, which this example passes on as user text
            messages.append(HumanMessage(content=content))
    return messages


def text_of(chunk):
    if isinstance(chunk, str):
        return chunk
    content = getattr(chunk, "content", "")
    if isinstance(content, list):  # content blocks
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def run_turn(runnable, turn):
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for chunk in runnable.stream(to_langchain(turn.get("context", []))):
        text = text_of(chunk)
        if text:
            send({"type": "delta", "id": turn["id"], "text": text})
        metadata = getattr(chunk, "usage_metadata", None) or {}
        usage["prompt_tokens"] += metadata.get("input_tokens", 0)
        usage["completion_tokens"] += metadata.get("output_tokens", 0)
    send({"type": "done", "id": turn["id"], "usage": usage})


def main():
    factory = load_factory(sys.argv[1] if len(sys.argv) > 1 else "")
    runnable = factory()
    send({"type": "ready"})
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("type") == "reset":
            runnable = factory()
            send({"type": "ready"})
        elif message.get("type") == "turn":
            try:
                run_turn(runnable, message)
            except Exception as error:  # the turn fails; the process lives on
                traceback.print_exc(file=sys.stderr)
                send({"type": "error", "id": message["id"], "message": str(error), "fatal": False})


if __name__ == "__main__":
    main()
