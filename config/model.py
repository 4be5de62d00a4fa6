"""What every settings model shares: frozen, unknown keys refused, sizes and durations with units."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

from config.units import parse_duration, parse_size

Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_duration)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
