"""Exact expected prompts for every chat template.

Conversations: SYSTEM (system + user), NO_SYSTEM (user), MULTI (user, assistant, user); each with
add_generation_prompt true and false. CARD_* are the example prompts the model cards print.
"""

from __future__ import annotations

from typing import Any

SYS = "You are a careful programmer."
Q1 = "Write hello world in Python."
A1 = "print('hello world')"
Q2 = "Now in C."

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "system": [{"role": "system", "content": SYS}, {"role": "user", "content": Q1}],
    "no_system": [{"role": "user", "content": Q1}],
    "multi_turn": [
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": Q2},
    ],
}

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)

# (family, conversation, add_generation_prompt) -> exact prompt
GOLDEN: dict[tuple[str, str, bool], str] = {
    # granite-code: System:/Question:/Answer: blocks, each followed by a blank line.
    ("granite-code", "system", True): "System:\nYou are a careful programmer.\n\nQuestion:\nWrite hello world in Python.\n\nAnswer:\n",
    ("granite-code", "system", False): "System:\nYou are a careful programmer.\n\nQuestion:\nWrite hello world in Python.\n\n",
    ("granite-code", "no_system", True): "Question:\nWrite hello world in Python.\n\nAnswer:\n",
    ("granite-code", "no_system", False): "Question:\nWrite hello world in Python.\n\n",
    ("granite-code", "multi_turn", True): "Question:\nWrite hello world in Python.\n\nAnswer:\nprint('hello world')\n\nQuestion:\nNow in C.\n\nAnswer:\n",
    ("granite-code", "multi_turn", False): "Question:\nWrite hello world in Python.\n\nAnswer:\nprint('hello world')\n\nQuestion:\nNow in C.\n\n",
    # granite (3.0): role tags, every turn ends <|end_of_text|>\n, no BOS, no default system.
    ("granite", "system", True): "<|start_of_role|>system<|end_of_role|>You are a careful programmer.<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Write hello world in Python.<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>",
    ("granite", "system", False): "<|start_of_role|>system<|end_of_role|>You are a careful programmer.<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Write hello world in Python.<|end_of_text|>\n",
    ("granite", "no_system", True): "<|start_of_role|>user<|end_of_role|>Write hello world in Python.<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>",
    ("granite", "no_system", False): "<|start_of_role|>user<|end_of_role|>Write hello world in Python.<|end_of_text|>\n",
    ("granite", "multi_turn", True): "<|start_of_role|>user<|end_of_role|>Write hello world in Python.<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>print('hello world')<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Now in C.<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>",
    ("granite", "multi_turn", False): "<|start_of_role|>user<|end_of_role|>Write hello world in Python.<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>print('hello world')<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Now in C.<|end_of_text|>\n",
    # chatml (Stable Code Instruct 3B): default system message when none is given.
    ("chatml", "system", True): "<|im_start|>system\nYou are a careful programmer.<|im_end|>\n<|im_start|>user\nWrite hello world in Python.<|im_end|>\n<|im_start|>assistant\n",
    ("chatml", "system", False): "<|im_start|>system\nYou are a careful programmer.<|im_end|>\n<|im_start|>user\nWrite hello world in Python.<|im_end|>\n",
    ("chatml", "no_system", True): "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite hello world in Python.<|im_end|>\n<|im_start|>assistant\n",
    ("chatml", "no_system", False): "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite hello world in Python.<|im_end|>\n",
    ("chatml", "multi_turn", True): "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite hello world in Python.<|im_end|>\n<|im_start|>assistant\nprint('hello world')<|im_end|>\n<|im_start|>user\nNow in C.<|im_end|>\n<|im_start|>assistant\n",
    ("chatml", "multi_turn", False): "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite hello world in Python.<|im_end|>\n<|im_start|>assistant\nprint('hello world')<|im_end|>\n<|im_start|>user\nNow in C.<|im_end|>\n",
    # alpaca: a system message replaces the preamble; responses follow '### Response:' directly.
    ("alpaca", "system", True): "You are a careful programmer.\n\n### Instruction:\nWrite hello world in Python.\n\n### Response:",
    ("alpaca", "system", False): "You are a careful programmer.\n\n### Instruction:\nWrite hello world in Python.",
    ("alpaca", "no_system", True): ALPACA_NO_INPUT + "\n\n### Instruction:\nWrite hello world in Python.\n\n### Response:",
    ("alpaca", "no_system", False): ALPACA_NO_INPUT + "\n\n### Instruction:\nWrite hello world in Python.",
    ("alpaca", "multi_turn", True): ALPACA_NO_INPUT + "\n\n### Instruction:\nWrite hello world in Python.\n\n### Response:print('hello world')\n\n### Instruction:\nNow in C.\n\n### Response:",
    ("alpaca", "multi_turn", False): ALPACA_NO_INPUT + "\n\n### Instruction:\nWrite hello world in Python.\n\n### Response:print('hello world')\n\n### Instruction:\nNow in C.",
    # codefuse: no separators, </s> after each bot turn, no BOS.
    ("codefuse", "system", True): "<|role_start|>system<|role_end|>You are a careful programmer.<|role_start|>human<|role_end|>Write hello world in Python.<|role_start|>bot<|role_end|>",
    ("codefuse", "system", False): "<|role_start|>system<|role_end|>You are a careful programmer.<|role_start|>human<|role_end|>Write hello world in Python.",
    ("codefuse", "no_system", True): "<|role_start|>human<|role_end|>Write hello world in Python.<|role_start|>bot<|role_end|>",
    ("codefuse", "no_system", False): "<|role_start|>human<|role_end|>Write hello world in Python.",
    ("codefuse", "multi_turn", True): "<|role_start|>human<|role_end|>Write hello world in Python.<|role_start|>bot<|role_end|>print('hello world')</s><|role_start|>human<|role_end|>Now in C.<|role_start|>bot<|role_end|>",
    ("codefuse", "multi_turn", False): "<|role_start|>human<|role_end|>Write hello world in Python.<|role_start|>bot<|role_end|>print('hello world')</s><|role_start|>human<|role_end|>Now in C.",
}

# Example prompts printed on the model cards: (family, messages, expected prompt).
CARD_EXAMPLES: list[tuple[str, list[dict[str, Any]], str]] = [
    (
        "granite-code",
        [{"role": "user", "content": "Write a code to find the maximum value in a list of numbers."}],
        "Question:\nWrite a code to find the maximum value in a list of numbers.\n\nAnswer:\n",
    ),
    (
        "granite",
        [{"role": "user", "content": "Please list one IBM Research laboratory located in the United States. "
          "You should only output its name and location."}],
        "<|start_of_role|>user<|end_of_role|>Please list one IBM Research laboratory located in the United "
        "States. You should only output its name and location.<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>",
    ),
    (
        "chatml",
        [
            {"role": "system", "content": "You are a helpful and polite assistant"},
            {"role": "user", "content": "Write a simple website in HTML. When a user clicks the button, it shows "
             "a random joke from a list of 4 jokes."},
        ],
        "<|im_start|>system\nYou are a helpful and polite assistant<|im_end|>\n<|im_start|>user\nWrite a simple "
        "website in HTML. When a user clicks the button, it shows a random joke from a list of 4 jokes."
        "<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "alpaca",
        [{"role": "user", "content": "{instruction}"}, {"role": "input", "content": "{input}"}],
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
        "### Input:\n{input}\n\n### Response:",
    ),
    (
        "codefuse",
        [{"role": "user", "content": "请用C++实现求解第n个斐波那契数"}],
        "<|role_start|>human<|role_end|>请用C++实现求解第n个斐波那契数<|role_start|>bot<|role_end|>",
    ),
]

# Conversations a format cannot express: (family, messages, words the error must contain).
INVALID: list[tuple[str, list[dict[str, Any]], str]] = [
    ("granite-code", [{"role": "tool", "content": "x"}], "no role 'tool'"),
    ("granite", [{"role": "critic", "content": "x"}], "no role 'critic'"),
    ("chatml", [{"role": "tool", "content": "x"}], "no role 'tool'"),
    ("codefuse", [{"role": "tool", "content": "x"}], "no role 'tool'"),
    ("alpaca", [{"role": "assistant", "content": "x"}], "must follow a user instruction"),
    ("alpaca", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "two instructions in a row"),
    ("alpaca", [{"role": "input", "content": "x"}], "must directly follow a user message"),
    ("alpaca", [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "system message must come first"),
]
