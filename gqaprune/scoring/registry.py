"""Every score by name, per axis: an explicit list (adding a score is one file under scores/ and one line here)."""

from __future__ import annotations

from gqaprune.scoring.base import Score
from gqaprune.scoring.scores.ablation import HeadAblation
from gqaprune.scoring.scores.activation import ChannelActivation, HeadActivation
from gqaprune.scoring.scores.frequency import ChannelFrequency
from gqaprune.scoring.scores.magnitude import ChannelMagnitude, HeadMagnitude
from gqaprune.scoring.scores.reconstruction import ChannelReconstruction, HeadReconstruction
from gqaprune.scoring.scores.seeded_random import ChannelRandom, HeadRandom
from gqaprune.scoring.scores.taylor import ChannelTaylor, HeadTaylor
from gqaprune.scoring.scores.taylor2 import HeadTaylor2
from gqaprune.scoring.scores.truncate import HeadTruncate

HEAD_SCORES: dict[str, Score] = {s.name: s for s in (
    HeadTaylor(), HeadTaylor2(), HeadMagnitude(), HeadActivation(), HeadRandom(), HeadTruncate(),
    HeadReconstruction(), HeadAblation())}
CHANNEL_SCORES: dict[str, Score] = {s.name: s for s in (
    ChannelTaylor(), ChannelMagnitude(), ChannelActivation(), ChannelFrequency(), ChannelRandom(),
    ChannelReconstruction())}
