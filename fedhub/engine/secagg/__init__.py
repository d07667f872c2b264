"""Secure aggregation (SecAgg+, Bell et al. 2020): the server learns only the sum of the updates.

Pure protocol logic with no transport: :class:`DeviceRound` and :class:`ServerRound` are
state machines that exchange the messages of :mod:`.messages` (JSON, and safetensors for the
masked input), so the HTTP layer only moves bytes. One round, per selected device:

1. setup -- receives :class:`RoundParams`; sends :class:`AdvertiseKeys` (two fresh X25519 keys);
2. share keys -- receives :class:`KeyDirectory` (its neighbours' keys); sends :class:`ShareKeys`
   (Shamir shares of its self-mask seed and mask key, each encrypted for its holder);
3. masked input -- receives :class:`ShareBundle` (shares dealt to it); sends :class:`MaskedInput`
   (its clipped, quantized, weighted update plus self and pairwise masks, modulo 2^bits);
4. unmask -- receives :class:`UnmaskRequest` (survivors, dropped); sends :class:`UnmaskResponse`
   (one share key per neighbour), and the server rebuilds the masks and decodes the mean.

Devices that drop after dealing their shares are recovered from ``threshold`` shares; fewer
survivors fail the round with :class:`TooFewSurvivors`.

Threat model. The server is honest but curious: it follows the protocol and learns only the
sum of the updates of at least ``threshold`` devices, never one device's update. Devices may
lie: a forged, misrouted, replayed or impersonating message is refused naming its sender and
the round goes on. Not covered: a server that lies about who dropped out to different devices
(that needs the consistency round of Bell et al.'s malicious variant, with device signatures
under a PKI), and devices that send a well-formed but poisoned update (masked inputs cannot be
inspected; the coordinate clipping bounds what each can add).
"""

from .device import DeviceRound
from .encoding import flatten, unflatten
from .errors import (
    ConfigError,
    ProtocolViolation,
    ReconstructionFailed,
    RoundFailed,
    SecAggError,
    ShareAuthenticationError,
    StaleMessage,
    TooFewSurvivors,
)
from .messages import (
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    MaskedSum,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from .params import RoundParams, SecAggConfig
from .server import SecAggResult, ServerRound

__all__ = [
    "AdvertiseKeys",
    "ConfigError",
    "DeviceRound",
    "KeyDirectory",
    "MaskedInput",
    "MaskedSum",
    "ProtocolViolation",
    "ReconstructionFailed",
    "RoundFailed",
    "RoundParams",
    "SecAggConfig",
    "SecAggError",
    "SecAggResult",
    "ServerRound",
    "ShareAuthenticationError",
    "ShareBundle",
    "ShareKeys",
    "StaleMessage",
    "TooFewSurvivors",
    "UnmaskRequest",
    "UnmaskResponse",
    "flatten",
    "unflatten",
]
