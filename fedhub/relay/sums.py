"""The partial sums a relay holds, and when it sends them: one mechanism for ``fedhub relay``
(real devices behind it) and a pool's worker (its virtual devices).

Each device's update of the open round is folded into that round's
:class:`~fedhub.engine.partials.PartialSum` as it arrives and sent to the server as one body when
every device that was handed the round's task through the relay is in, when ``max_devices``
are in, or ``flush_after`` seconds after the first. Only while the server's status says the round takes
partial sums (``partial_sums``); otherwise the caller sends each update on as it came. In a secure
round the same holds for the devices' masked updates (:class:`~fedhub.relay.masked.MaskedPartialSum`):
summed here modulo the round's field while its masked stage is open, with the round's parameters
seen in its first stage's tasks as they passed through.

With a ``state_dir`` (``fedhub relay``) nothing acknowledged is lost to a SIGKILL and nothing is
counted twice: an update is on disk (the round's pending sum) before the device hears "accepted";
a sum about to be sent is first written as the exact bytes to send (the outbox), whose key is
their digest, so a restarted relay sends the same bytes again and the server acknowledges them as
a retry; the keys of what was sent are kept, so a device retrying an update already sent is told
"duplicate" instead of being folded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedhub.device.client import Client, ServerError
from fedhub.engine import partials, wire
from fedhub.engine.device_logs import MAX_BATCH as MAX_LINES_PER_DEVICE
from fedhub.engine.errors import Conflict, InvalidInput
from fedhub.engine.files import atomic_write_bytes, atomic_write_text
from fedhub.engine.relays import MAX_REPORT_LINES
from fedhub.engine.secagg import MaskedInput, MaskedSum, RoundParams, SecAggError
from fedhub.engine.secagg.messages import MAX_SUM_HEADER

from .masked import MaskedPartialSum

log = logging.getLogger("fedhub.relay")
MAX_QUEUED_LINES = 20_000  # waiting for the next flush, all devices together


class RelaySums:
    """Partial sums of the rounds a relay serves; thread-safe. ``upstream`` is the relay's
    authenticated client of the server (its name is the relay's name)."""

    def __init__(self, upstream: Client, *, state_dir: str | Path | None = None,
                 max_devices: int = partials.MAX_DEVICES, flush_after: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= max_devices <= partials.MAX_DEVICES:
            raise ValueError(f"max_devices must be from 1 to {partials.MAX_DEVICES}")
        self.upstream = upstream
        self.name = upstream.name
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.max_devices = max_devices
        self.flush_after = flush_after
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[int, partials.PartialSum | MaskedPartialSum] = {}
        self._first: dict[int, float] = {}  # when the round's pending sum got its first update
        self._keys: dict[int, dict[str, tuple[str | None, str]]] = {}  # round -> device -> (key, digest)
        self._outbox: list[tuple[int, bytes]] = []
        self.accepting = False
        self.clipping_norm: float | None = None  # the open round's sums are of changes clipped to it
        self.observed = False  # a status seen: until then no round counts as over
        self.open_round: int | None = None
        self.masked_stage = False  # the open round is secure, at its masked stage
        self._secure: dict[int, RoundParams] = {}  # secure rounds' parameters, from their tasks
        self._started: dict[int, Any] = {}  # round -> when its attempt the relay knows began
        self.tasked: dict[int, set[str]] = {}  # round -> devices handed its task through this relay
        self._caught_up: set[tuple[int, bool]] = set()  # (round, masked): status looked at again
        self.seen: set[str] = set()  # every device handed a task through this relay
        self.awaited: set[str] = set()  # devices the open round still waits for
        self.sent_devices = 0
        self.sent_sums = 0
        self.refused_devices = 0  # in sums the server refused (the round closed meanwhile)
        self._reports: list[dict[str, Any]] = []  # devices' evaluations and log lines, for the next flush
        self._report_lines = 0
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.state_dir.chmod(0o700)  # the sums on disk carry their devices' tokens
            self._recover()

    # what the server says ---------------------------------------------------
    def observe(self, status: Mapping[str, Any]) -> None:
        """The server's status: does the open round take partial sums, and whom does it await."""
        current = status.get("round") or {}
        number, started = current.get("number"), current.get("started_at")
        with self._lock:
            self.observed = True
            self.accepting = bool(status.get("partial_sums")) and status.get("status") == "running"
            self.clipping_norm = status.get("partial_clipping_norm")
            self.open_round = current.get("number")
            self.masked_stage = (current.get("secagg") or {}).get("stage") == "masked"
            self.awaited = set(current.get("selected", ())) - set(current.get("reported", ()))
            if isinstance(number, int):
                if number in self._started and self._started[number] != started:
                    # the round runs again (its last attempt was discarded, with what was sent to
                    # it), or a new run has begun, numbering its rounds from 1 again
                    self._drop_round(number)
                self._started[number] = started
                for old in [n for n in self._keys if n < number - 1 and n not in self._pending]:
                    self._drop_round(old)  # long closed: a retry of its updates cannot come now
                    self._started.pop(old, None)
                for old in [n for n in self._secure if n < number - 1]:
                    del self._secure[old]
                self._caught_up = {seen for seen in self._caught_up if seen[0] >= number - 1}

    def _drop_round(self, number: int) -> None:
        """Forget round ``number``'s updates (lock held)."""
        self._pending.pop(number, None)
        self._first.pop(number, None)
        self._keys.pop(number, None)
        self.tasked.pop(number, None)
        self._forget_pending(number)
        if self.state_dir is not None:
            self._keys_path(number).unlink(missing_ok=True)

    def holds(self, name: str, round_number: int) -> bool:
        """Device ``name``'s update for the round is here (pending, or sent a moment ago): until
        the server has it, the server would hand the device the round's task again."""
        with self._lock:
            return name in self._keys.get(round_number, {})

    def passing(self, name: str, task: Mapping[str, Any]) -> dict[str, Any] | None:
        """Device ``name``'s task on its way to it through this relay; what it is told instead,
        or None for ``task`` as it is. A task to train in a round whose update from the device is
        held here becomes a wait (the server, which has not got it yet, would have it train the
        round again); a task to train makes the round's sum wait for its update (until
        ``flush_after``); a secure round's first task carries the parameters its masked updates
        are summed with."""
        number, action = task.get("round"), task.get("action")
        if not isinstance(number, int):
            return None
        if action == "secagg" and task.get("stage") == "advertise":
            self._learn(number, task.get("message"))
        if action != "train":
            return None
        if self.holds(name, number):
            return {"action": "wait", "retry_in": 1.0,
                    "reason": f"update for round {number} held by relay {self.name}; waiting for the "
                              "round to close"}
        with self._lock:
            self.tasked.setdefault(number, set()).add(name)
            self.seen.add(name)
        return None

    def _learn(self, number: int, message: object) -> None:
        """A secure round's parameters (its advertise stage's message; a round run again brings new ones)."""
        with self._lock:
            known = self._secure.get(number)
        if known is not None and known.to_dict() == message:
            return
        try:
            params = RoundParams.from_dict(message)
        except SecAggError as exc:  # the device refuses it too: its masked update, if any, passes through
            log.warning("relay %s: round %d's secure-aggregation parameters: %s", self.name, number, exc)
            return
        if params.round == number:
            with self._lock:
                self._secure[number] = params

    def behind(self, name: str, round_number: int, *, masked: bool = False) -> bool:
        """Whether device ``name``'s update (``masked``: masked update) for round ``round_number``
        shows the status last seen here to be old: the device was handed that round's task through
        this relay (a secure round's parameters learned), but the status seen was of another round
        (or stage). The caller then looks at the server's status again, once a round and stage."""
        with self._lock:
            if masked:
                lagging = round_number in self._secure and not (
                    self.masked_stage and round_number == self.open_round)
            else:
                lagging = round_number != self.open_round and name in self.tasked.get(round_number, ())
            if not lagging or (round_number, masked) in self._caught_up:
                return False
            self._caught_up.add((round_number, masked))
            return True

    def takes(self, round_number: int) -> bool:
        with self._lock:
            return self.accepting and round_number == self.open_round

    def takes_masked(self, round_number: int) -> bool:
        """Round ``round_number`` is secure, at its masked stage, with parameters known here."""
        with self._lock:
            return self.masked_stage and round_number == self.open_round and round_number in self._secure

    # folding ----------------------------------------------------------------
    def fold(self, name: str, token: str, round_number: int, weights: Mapping[str, np.ndarray],
             meta: wire.Meta, key: str | None = None, digest: str = "", *,
             reference: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Fold device ``name``'s update in (``token``: the device's, which the sum carries for
        it; ``reference``: the global model it trained from, which a round under central DP
        needs to clip its change); the answer the device gets. The same ``key`` and ``digest``
        again is a retry (``duplicate``); another update from it this round, a Conflict. Refused
        as the server refuses it: NaN or infinity, no examples."""
        bad = wire.first_non_finite(weights)
        if bad is not None:
            raise InvalidInput(f"tensor {bad!r} holds NaN or infinity", bad)
        if meta.num_examples < 1:
            raise InvalidInput("metadata 'num_examples' must be a positive integer", "num_examples")
        with self._lock:
            keys = self._keys.setdefault(round_number, {})
            if name in keys:
                if key is not None and keys[name] == (key, digest):
                    return {"accepted": True, "duplicate": True, "round": round_number, "relay": self.name}
                raise Conflict(f"device {name!r} already reported for round {round_number}", "round")
            pending = self._pending.get(round_number)
            if pending is None:
                pending = self._pending[round_number] = partials.PartialSum(
                    round_number, meta.model_version, self.clipping_norm)
                self._first[round_number] = self._clock()
            if meta.model_version != pending.model_version:
                raise Conflict(f"update was trained from model version {meta.model_version}, round "
                               f"{round_number} starts from version {pending.model_version}", "model_version")
            pending.fold(name, weights, meta.num_examples, meta.metrics, token=token, reference=reference)
            keys[name] = (key, digest)
            self._save_pending(round_number)
            held = len(pending)
        return {"accepted": True, "duplicate": False, "round": round_number, "relay": self.name,
                "held": held}

    def fold_masked(self, name: str, token: str, round_number: int, body: bytes) -> dict[str, Any]:
        """Add device ``name``'s masked update (the body it sent) to the round's masked sum; the
        answer the device gets. Refused as the server refuses it (a message of another device or
        round, a vector outside the field, refusals of devices that dealt it nothing); the same
        body again is a retry (``duplicate``), another one a Conflict."""
        with self._lock:
            params = self._secure[round_number]
        if name not in params.order:
            raise Conflict(f"device {name!r} is not in round {round_number}", "round")
        message = MaskedInput.from_bytes(body, params, name)
        if message.device != name:
            raise InvalidInput(f"device {name!r} sent a message in the name of device {message.device!r}",
                               "device")
        if message.round != round_number:
            raise Conflict(f"device {name!r} sent a masked update for round {message.round} to round "
                           f"{round_number}", "round")
        strangers = sorted(set(message.refused) - params.neighbours(name))
        if strangers:
            raise InvalidInput(f"device {name!r} refuses shares of {strangers[0]!r}, which dealt none to it",
                               "refused")
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            keys = self._keys.setdefault(round_number, {})
            if name in keys:
                if keys[name] == (None, digest):
                    return {"accepted": True, "duplicate": True, "round": round_number, "stage": "masked",
                            "relay": self.name}
                raise Conflict(f"device {name!r} already sent a different masked update in round "
                               f"{round_number}", "device")
            pending = self._pending.get(round_number)
            if not isinstance(pending, MaskedPartialSum) or pending.params is not params:
                if pending is not None:  # the round ran again with new keys: its old inputs are void
                    self._drop_round(round_number)
                    keys = self._keys.setdefault(round_number, {})
                pending = self._pending[round_number] = MaskedPartialSum(params)
                self._first[round_number] = self._clock()
            pending.fold(message, token=token)
            keys[name] = (None, digest)
            self._save_pending(round_number)
            held = len(pending)
        return {"accepted": True, "duplicate": False, "round": round_number, "stage": "masked",
                "relay": self.name, "held": held}

    def due(self) -> list[int]:
        """Rounds whose pending sum should go now: every device handed the round's task through
        this relay is in (and every device it ever served that the open round awaits), or
        ``max_devices`` are, or ``flush_after`` seconds passed, or the round is over."""
        now = self._clock()
        with self._lock:
            out = []
            for number, pending in self._pending.items():
                waiting = self.tasked.get(number, set())
                if number == self.open_round:  # and those it knows that the round awaits
                    waiting = waiting | (self.awaited & self.seen)
                complete = not waiting - set(self._keys.get(number, {}))
                over = self.observed and number != self.open_round
                if (complete or over or len(pending) >= self.max_devices
                        or now - self._first[number] >= self.flush_after):
                    out.append(number)
            return out

    def report(self, name: str, token: str, *, evaluation: Mapping[str, Any] | None = None,
               logs: Collection[Mapping[str, Any]] = ()) -> None:
        """Device ``name``'s evaluation report or log lines, sent with the next :meth:`flush`
        before its sums, with every other device's, in one request (not kept on disk: a worker's
        devices live in its memory too). Lines beyond :data:`MAX_QUEUED_LINES` are dropped, as
        a device's own log handler drops what it cannot send."""
        with self._lock:
            if evaluation is not None:
                self._reports.append({"name": name, "token": token, "evaluation": dict(evaluation)})
            lines = [dict(line) for line in logs][: max(0, MAX_QUEUED_LINES - self._report_lines)]
            for start in range(0, len(lines), MAX_LINES_PER_DEVICE):
                self._reports.append({"name": name, "token": token,
                                      "logs": lines[start : start + MAX_LINES_PER_DEVICE]})
            self._report_lines += len(lines)

    def _send_reports(self) -> None:
        """What :meth:`report` gathered, in as few requests as the server's bounds allow; a
        refused request is dropped with a warning (as the devices' own would have been), one
        that cannot reach the server waits for the next flush."""
        with self._lock:
            items, self._reports, self._report_lines = self._reports, [], 0
        batches: list[list[dict[str, Any]]] = []
        names: set[str] = set()
        lines = 0
        for item in items:
            more = len(item.get("logs", ()))
            if not batches or item["name"] in names or len(batches[-1]) == partials.MAX_DEVICES \
                    or lines + more > MAX_REPORT_LINES:
                batches.append([])
                names, lines = set(), 0
            batches[-1].append(item)
            names.add(item["name"])
            lines += more
        for i, batch in enumerate(batches):
            try:
                answer = self.upstream.send_relay_reports(batch)
            except ServerError as exc:
                log.warning("relay %s: its devices' reports were refused: %s", self.name,
                            exc.body.get("message"))
                continue
            except Exception:
                with self._lock:
                    later = [item for rest in batches[i:] for item in rest]
                    self._reports[:0] = later
                    self._report_lines += sum(len(item.get("logs", ())) for item in later)
                raise
            for device in answer.get("devices", ()):
                evaluation = device.get("evaluation") or {}
                if evaluation.get("accepted") is False:
                    log.info("relay %s: %s's evaluation not kept: %s", self.name, device.get("name"),
                             evaluation.get("message"))

    # sending ----------------------------------------------------------------
    def flush(self, rounds: Collection[int] | None = None) -> int:
        """Send the devices' reports, then the pending sums of ``rounds`` (default: all) and
        whatever waits in the outbox; the devices the server counted. A sum the server refuses
        (the round closed meanwhile) is dropped with a warning, as its devices' updates would
        have been; one that cannot reach the server waits in the outbox for the next flush."""
        self._send_reports()  # first: a round's history summarizes the evaluations sent before it closes
        with self._lock:
            for number in sorted(self._pending if rounds is None else rounds):
                pending = self._pending.pop(number, None)
                self._first.pop(number, None)
                if pending is None or not len(pending):
                    continue
                body = pending.encode()
                self._outbox.append((number, body))
                self._save_outbox(number, body)
                self._forget_pending(number)
            outbox, self._outbox = self._outbox, []
        counted = 0
        for i, (number, body) in enumerate(outbox):
            devices = len(_devices_of(body))
            try:
                answer = self.upstream.send_partial(number, body, masked=_is_masked(body))
            except ServerError as exc:
                log.warning("relay %s: round %d's partial sum was refused: %s", self.name, number,
                            exc.body.get("message"))
                self._sent(number, body, devices, refused=True)
                continue
            except Exception:
                with self._lock:
                    self._outbox[:0] = outbox[i:]  # in order, before anything queued meanwhile
                raise
            counted += 0 if answer.get("duplicate") else devices
            self._sent(number, body, devices)
        return counted

    def _sent(self, number: int, body: bytes, devices: int, refused: bool = False) -> None:
        """``body`` (``devices`` devices' updates) went to the server, and was taken or
        ``refused``: out of the outbox."""
        with self._lock:
            if refused:
                self.refused_devices += devices
            else:
                self.sent_sums += 1
                self.sent_devices += devices
            self._save_keys(number)
        if self.state_dir is not None:
            self._outbox_path(number, body).unlink(missing_ok=True)

    def view(self) -> dict[str, Any]:
        """What the relay holds and has sent (its ``/relay/status``)."""
        with self._lock:
            return {"name": self.name, "accepting": self.accepting, "open_round": self.open_round,
                    "pending": {str(n): len(p) for n, p in self._pending.items()},
                    "outbox": len(self._outbox), "sent_sums": self.sent_sums,
                    "sent_devices": self.sent_devices, "refused_devices": self.refused_devices}

    # on disk ----------------------------------------------------------------
    def _pending_path(self, number: int) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"pending-r{number}.safetensors"

    def _outbox_path(self, number: int, body: bytes) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"outbox-r{number}-{hashlib.sha256(body).hexdigest()[:16]}.safetensors"

    def _keys_path(self, number: int) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"keys-r{number}.json"

    def _save_pending(self, number: int) -> None:
        """The round's pending sum and every key it holds, in one file (lock held)."""
        if self.state_dir is None:
            return
        keys = {n: list(k) for n, k in self._keys[number].items() if n in self._pending[number].shares}
        atomic_write_bytes(self._pending_path(number),
                           self._pending[number].encode(extra={"keys": json.dumps(keys)}))

    def _forget_pending(self, number: int) -> None:
        if self.state_dir is not None:
            self._pending_path(number).unlink(missing_ok=True)

    def _save_outbox(self, number: int, body: bytes) -> None:
        if self.state_dir is not None:
            atomic_write_bytes(self._outbox_path(number, body), body)

    def _save_keys(self, number: int) -> None:
        """The keys of every update of round ``number`` this relay took (lock held)."""
        if self.state_dir is not None:
            atomic_write_text(self._keys_path(number), json.dumps(
                {n: list(k) for n, k in self._keys.get(number, {}).items()}))

    def _recover(self) -> None:
        """After a restart: the outbox to send again, the pending sums, the keys of what was sent."""
        assert self.state_dir is not None
        for path in sorted(self.state_dir.glob("keys-r*.json")):
            number = int(path.stem.removeprefix("keys-r"))
            self._keys[number] = {n: (k[0], k[1]) for n, k in json.loads(path.read_text()).items()}
        queued: set[tuple[int, str]] = set()
        for path in sorted(self.state_dir.glob("outbox-r*.safetensors")):
            number = int(path.stem.split("-")[1].removeprefix("r"))
            body = path.read_bytes()
            self._outbox.append((number, body))
            queued.update((number, n) for n in _devices_of(body))
        for path in sorted(self.state_dir.glob("pending-r*.safetensors")):
            number = int(path.stem.removeprefix("pending-r"))
            body = path.read_bytes()
            kind = MaskedPartialSum if _is_masked(body) else partials.PartialSum
            pending, keys = kind.restore(body)
            if isinstance(pending, MaskedPartialSum):
                self._secure[number] = pending.params
            if any((number, n) in queued for n in pending.shares):
                path.unlink()  # killed between writing its outbox copy and removing it
                continue
            self._pending[number] = pending
            self._first[number] = self._clock()
            self._keys.setdefault(number, {}).update({n: (k[0], k[1]) for n, k in keys.items()})


def _is_masked(body: bytes) -> bool:
    """Whether ``body`` (one this process encoded) is a masked sum, not a partial sum of updates."""
    raw = wire.header(body, max_header=MAX_SUM_HEADER).get("__metadata__") or {}
    return raw.get("stage") == MaskedSum.STAGE


def _devices_of(body: bytes) -> list[str]:
    """The devices named in a sum's body (either kind; one this process encoded)."""
    raw = wire.header(body, max_header=MAX_SUM_HEADER).get("__metadata__") or {}
    return [entry["name"] for entry in json.loads(raw.get("devices", "[]"))]
