"""A LangChain Runnable for langchain_adapter.py: echoes the last human message, streamed.

    python3 langchain_adapter.py langchain_echo:build

Replace build() with one returning your own chain or chat model.
"""

from langchain_core.runnables import RunnableGenerator


def _echo(inputs):
    for messages in inputs:
        humans = [message.content for message in messages if message.type == "human"]
        reply = "echo: " + (humans[-1] if humans else "")
        for start in range(0, len(reply), 8):
            yield reply[start:start + 8]


def build():
    return RunnableGenerator(_echo)
