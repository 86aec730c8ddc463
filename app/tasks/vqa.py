"""Visual question answering: `question` about `image`, top-k `{answer, score}`."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.core.errors import InvalidInput
from app.core.items import Item
from app.tasks.base import QuestionBatchRequest, QuestionRequest, ScoresTask


class AnswerScore(BaseModel):
    answer: str
    score: float


class VqaResponse(BaseModel):
    model: str
    version: int
    answers: list[AnswerScore]


class Vqa(ScoresTask):
    name = "vqa"
    text_field = "question"
    text_description = "the question"
    v2_text_content = "the question (UTF-8 text)"
    request_model = QuestionRequest
    batch_request_model = QuestionBatchRequest
    response_model = VqaResponse
    description = "Answer `question` about `image` (audio optional when the model takes it): top-k `{answer, score}`."
    example_text = "what colour is the square?"
    required_media = ("image",)
    result_field, label_key = "answers", "answer"

    def check(self, modalities: list[str], item: Item) -> None:
        if "image" in modalities and item.image is None:
            raise InvalidInput("'image' is required for visual question answering")

    def examples(self, png: str, wav: str) -> dict[str, Any]:
        tf, text = self.text_field, self.example_text
        return {"text_image_audio": {"summary": "text + image + audio (base64)",
                                     "value": {tf: text, "image": png, "audio": wav, "top_k": 3}},
                "text_image": {"summary": "question + image (base64)", "value": {tf: text, "image": png}}}


TASK = Vqa()
