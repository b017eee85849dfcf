"""The DeepSeek-R1 template: the reasoning in <think>...</think>, the answer in <answer>...</answer>
(R1 report §2.2.1, Table 1). The four tags are special tokens of the tokenizer (never split, one id
each), added to a trained tokenizer with `dsv3.data.tokenizer.add_special_tokens`."""
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
R1_SPECIAL_TOKENS = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE]

R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>.")


def r1_prompt(question: str, system_prompt: str = R1_SYSTEM_PROMPT) -> str:
    """The text the model continues. An empty system prompt leaves just the exchange (small models, short contexts)."""
    head = f"{system_prompt} " if system_prompt else ""
    return f"{head}User: {question.strip()} Assistant:"


def r1_completion(reasoning: str, answer: str) -> str:
    """A completion in the template; what the format reward accepts and SFT teaches."""
    return f" {THINK_OPEN} {reasoning.strip()} {THINK_CLOSE} {ANSWER_OPEN} {answer.strip()} {ANSWER_CLOSE}"
