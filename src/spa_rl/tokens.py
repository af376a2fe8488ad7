"""The one path from a conversation to token ids and loss masks.

Rollouts (token-in, token-out), SFT rows and PPO batches all go through `ChatTokenizer` and
`TokenSequence`. A context grows as

    prompt_ids(system, user_1)                      # ... <|im_start|>assistant\n<think>
    + assistant ids of turn 1                       # sampled ids at rollout, canonical ids in SFT
    + continuation_ids(user_2, ended_with_eos)      # <|im_end|>\n<|im_start|>user\n...assistant\n<think>
    + assistant ids of turn 2 ...

Nothing is ever re-tokenised from decoded text: the ids a model sampled stay the ids it is
trained on. The pieces between assistant turns come from the tokenizer's own chat template
(found once by rendering a marker message), so no model's token ids are assumed.

Torch-free on purpose: the text protocol and data generation use it without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from spa_rl.errors import ConfigError

GENERATION_PREFIX = "<think>"
_MARKER = "SPA_RL_ASSISTANT_CONTENT_MARKER"
# The world-model spans whose contents the SFT masking ablation leaves untrained.
WORLD_MODEL_TAGS = (("<observation>", "</observation>"), ("<prediction>", "</prediction>"))


def content_spans(text: str, tags: Sequence[tuple[str, str]] = WORLD_MODEL_TAGS) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of the contents between each opening and closing tag.

    Matching is that of `agent.worldmodel.substitute_world_model`: left to right, an opening
    tag pairs with the next closing tag; an unclosed opening tag gives no span. Sorted by start.
    """
    from spa_rl.agent.worldmodel import tag_content_spans

    spans = []
    for open_tag, close_tag in tags:
        spans.extend(tag_content_spans(text, open_tag, close_tag))
    return sorted(spans)


class ChatTokenizer:
    """Chat-template pieces as token ids for one tokenizer.

    Works with any template that renders earlier assistant turns verbatim (ChatML: SmolLM2,
    Qwen2.5; Llama 3). A template that rewrites history (e.g. strips reasoning) is refused at
    construction, because token-in-token-out contexts would no longer match its rendering.
    """

    def __init__(self, tokenizer: Any, generation_prefix: str = GENERATION_PREFIX):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template")
        self.tokenizer = tokenizer
        self.generation_prefix = generation_prefix
        self.eos_token = tokenizer.eos_token
        self.eos_token_id = tokenizer.eos_token_id
        self._turn_end_text = self._find_turn_end_text()

    # -- rendering ---------------------------------------------------------------------------
    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` plus each token's character span in `text` (fast tokenizers only)."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(f"tokenizer {getattr(self.tokenizer, 'name_or_path', '?')!r} is not a fast "
                              "tokenizer; span masks need its offset mapping")
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _find_turn_end_text(self) -> str:
        """What the template writes between an assistant message's content and the next message.

        Rendered with a marker in place of the content; checked to be a pure continuation of the
        generation prompt, which is what makes incremental token contexts exact.
        """
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        with_gen = self.render(probe, add_generation_prompt=True)
        full = self.render(probe + [{"role": "assistant", "content": self.generation_prefix + _MARKER}], False)
        if not full.startswith(with_gen + self.generation_prefix + _MARKER):
            raise ConfigError(
                "the tokenizer's chat template does not render assistant turns verbatim after its "
                "generation prompt; spa-rl needs that to keep rollout token ids exact"
            )
        return full[len(with_gen + self.generation_prefix + _MARKER):]

    # -- pieces ------------------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Ids of a conversation ending with a user message, plus assistant header and prefix."""
        return self.encode(self.render(messages, add_generation_prompt=True) + self.generation_prefix)

    def assistant_ids(self, response: str) -> list[int]:
        """Canonical ids of a response written after the generation prefix, ending the turn.

        `response` excludes the prefix (it is part of the prompt). Used for text data (SFT rows);
        at rollout the sampled ids take this place.
        """
        if response.startswith(self.generation_prefix):
            response = response[len(self.generation_prefix):]
        return self.encode(response) + [self.eos_token_id]

    def assistant_ids_and_mask(self, response: str, masked_tags: Sequence[tuple[str, str]]) -> tuple[list[int], list[bool]]:
        """`assistant_ids(response)` and, per token, whether it is trained: a token is NOT
        trained when any of its characters lies inside the content of one of `masked_tags`
        (e.g. `<observation>...</observation>`). Tags themselves and the end-of-turn token stay
        trained. The ids are exactly those of `assistant_ids`; only the mask differs.

        A token that straddles a tag and its content (BPE may merge `>` with the first content
        characters) counts as content: no loss is ever taken on a content character.
        """
        if response.startswith(self.generation_prefix):
            response = response[len(self.generation_prefix):]
        ids, offsets = self.encode_with_offsets(response)
        spans = content_spans(response, masked_tags)
        trained = [not any(a < end and start < b for start, end in spans) for a, b in offsets]
        return ids + [self.eos_token_id], trained + [True]

    def continuation_ids(self, user_message: dict | None, ended_with_eos: bool) -> list[int]:
        """Ids that follow an assistant turn: the rest of its turn end, then the next user turn
        and the next generation prompt (or just the turn end when `user_message` is None)."""
        text = self._turn_end_text
        if ended_with_eos and self.eos_token and text.startswith(self.eos_token):
            text = text[len(self.eos_token):]
        if user_message is not None:
            # The template renders a user turn and the next header the same way anywhere in a
            # conversation: render it after a minimal one and keep only the new part.
            probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                     {"role": "assistant", "content": self.generation_prefix + _MARKER}]
            before = self.render(probe, add_generation_prompt=False)
            after = self.render(probe + [user_message], add_generation_prompt=True)
            if not after.startswith(before):
                raise ConfigError("the tokenizer's chat template rewrites earlier turns; cannot build contexts")
            text += after[len(before):] + self.generation_prefix
        return self.encode(text) if text else []


@dataclass
class TokenSequence:
    """A whole conversation as ids, with a per-token mask of the tokens that are trained on.

    `loss_mask[i] == 1` means token i is an assistant token (the model produced it), so the
    logit at position i-1 is trained to predict it. `logprobs[i]` is the sampling log-prob of
    token i where it was sampled (rollouts), else 0.0. `turn_ids[i]` numbers assistant turns
    from 1 (0 for prompt and environment tokens).
    """

    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_ids: list[int] = field(default_factory=list)

    def add(self, ids: Sequence[int], trained: bool | Sequence[bool], logprobs: Sequence[float] | None = None,
            turn: int = 0):
        """Append `ids`. `trained` is one flag for all of them, or one flag per id (a turn whose
        world-model spans are masked); with per-id flags every id gets `turn` as its turn id."""
        if logprobs is not None and len(logprobs) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(logprobs)} log-probs")
        if isinstance(trained, bool):
            flags, turns = [1 if trained else 0] * len(ids), [turn if trained else 0] * len(ids)
        else:
            if len(trained) != len(ids):
                raise ValueError(f"{len(ids)} ids but {len(trained)} trained flags")
            flags, turns = [1 if t else 0 for t in trained], [turn] * len(ids)
        self.input_ids.extend(int(i) for i in ids)
        self.loss_mask.extend(flags)
        self.logprobs.extend(float(x) for x in logprobs) if logprobs is not None else self.logprobs.extend(
            [0.0] * len(ids))
        self.turn_ids.extend(turns)
        return self

    def __len__(self) -> int:
        return len(self.input_ids)


def conversation_to_sequence(chat: ChatTokenizer, messages: Sequence[dict], train_turns: str = "all",
                             masked_tags: Sequence[tuple[str, str]] = ()) -> TokenSequence:
    """Token ids and loss mask of a text conversation [system, user, assistant, user, assistant ...].

    Built incrementally, exactly as a rollout builds its context, so SFT trains on the ids PPO
    will later see. `train_turns`: "all" (every assistant turn trained) or "last" (only the
    final assistant turn; earlier turns are context, as in one SFT row per turn).
    `masked_tags`: in trained turns, the contents of these tag pairs get no loss (the SFT
    world-model masking ablation: `WORLD_MODEL_TAGS`); the ids do not change.
    """
    if train_turns not in ("all", "last"):
        raise ValueError(f"train_turns must be 'all' or 'last', not {train_turns!r}")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError("conversation has no assistant message")
    first_assistant = roles.index("assistant")
    if any(r == "assistant" for r in roles[:first_assistant]) or roles[first_assistant - 1] != "user":
        raise ValueError("the first assistant message must follow a user message")
    last_assistant = len(roles) - 1 - roles[::-1].index("assistant")
    seq = TokenSequence()
    seq.add(chat.prompt_ids(messages[:first_assistant]), trained=False)
    turn = 0
    i = first_assistant
    while i < len(messages):
        msg = messages[i]
        if msg["role"] != "assistant":
            raise ValueError(f"message {i} should be an assistant message, found {msg['role']!r}")
        turn += 1
        trained = train_turns == "all" or i == last_assistant
        if trained and masked_tags:
            ids, flags = chat.assistant_ids_and_mask(msg["content"], masked_tags)
            seq.add(ids, trained=flags, turn=turn)
        else:
            seq.add(chat.assistant_ids(msg["content"]), trained=trained, turn=turn)
        if i == last_assistant:
            break
        nxt = messages[i + 1]
        if nxt["role"] != "user":
            raise ValueError(f"message {i + 1} should be a user message, found {nxt['role']!r}")
        seq.add(chat.continuation_ids(nxt, ended_with_eos=True), trained=False)
        i += 2
    return seq
