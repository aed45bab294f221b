"""Qwen's control tokens: the same names and ids in Qwen-7B v1, Qwen2, Qwen2.5 and Qwen3.

    <|endoftext|> 151643   ends every pretraining document; the pad token; no BOS exists
    <|im_start|>  151644   opens a ChatML turn
    <|im_end|>    151645   ends a ChatML turn; the eos of chat-tuned models
"""

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645

# Generation of a chat answer stops at the end of the turn, or of the text.
CHAT_STOP_IDS = (IM_END_ID, ENDOFTEXT_ID)
