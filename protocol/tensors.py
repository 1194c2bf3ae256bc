"""Tensor specs: what a message announces before any tensor bytes travel."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

# dtype name -> bytes per element. Names follow torch (str(torch.float32) == "torch.float32").
SUPPORTED_DTYPES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
}


class TensorSpec(BaseModel):
    """One tensor of a message: its name, dtype and shape, in the order the tensors travel."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    dtype: str
    shape: tuple[int, ...]

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        v = v.removeprefix("torch.")
        if v not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported dtype {v!r}; supported: {sorted(SUPPORTED_DTYPES)}")
        return v

    @field_validator("shape")
    @classmethod
    def _non_negative(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) > 8:
            raise ValueError(f"at most 8 dimensions, got {len(v)}")
        if any(d < 0 for d in v):
            raise ValueError(f"negative dimension in {v}")
        return v

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * SUPPORTED_DTYPES[self.dtype]
