"""Varied prompts for model-vs-HF tests: chat-templated and raw, short and long."""

LONG_TEXT = (
    "The history of computing is a story of abstraction layered upon abstraction. Early machines were "
    "programmed by rewiring plugboards; then came stored programs, assemblers, compilers, operating "
    "systems, networks, and finally the web. Each layer hid the details of the one below it, letting "
    "people think about larger problems. "
)

LONG_CODE = '''def merge_sort(items):
    """Sort a list with merge sort and return a new list."""
    if len(items) <= 1:
        return list(items)
    mid = len(items) // 2
    left = merge_sort(items[:mid])
    right = merge_sort(items[mid:])
    out = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            out.append(left[i]); i += 1
        else:
            out.append(right[j]); j += 1
    out.extend(left[i:]); out.extend(right[j:])
    return out


class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count=1):
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count=1):
        if self.items.get(name, 0) < count:
            raise ValueError(f"not enough {name}")
        self.items[name] -= count
'''

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    LONG_TEXT * 6 + "In summary, the most important idea in computing is",
    LONG_CODE + "\n# Example usage of the two pieces above:\n",
]

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Explain this code briefly:\n" + LONG_CODE}],
    [{"role": "user", "content": "Summarize:\n" + LONG_TEXT * 5},
     {"role": "assistant", "content": "Computing grew through layers of abstraction."},
     {"role": "user", "content": "Give one example of such a layer."}],
]
