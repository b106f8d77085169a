#!/usr/bin/env python3
"""A process agent that echoes the last user message, in chunks (docs/agent-protocol.md)."""

import json
import sys


def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main():
    chunk = 8
    send({"type": "ready"})
    for line in sys.stdin:
        message = json.loads(line)
        kind = message.get("type")
        if kind == "reset":
            send({"type": "ready"})
        elif kind == "turn":
            turn = message["id"]
            context = message.get("context", [])
            users = [m["content"] for m in context if m.get("role") == "user"]
            reply = "echo: " + (users[-1] if users else "")
            for start in range(0, len(reply), chunk):
                send({"type": "delta", "id": turn, "text": reply[start:start + chunk]})
            prompt = sum(len(m.get("content", "").split()) for m in context)
            send({"type": "done", "id": turn,
                  "usage": {"prompt_tokens": prompt, "completion_tokens": len(reply.split())}})
        else:
            print(f"echo_agent: unknown message type {kind!r}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
