"""The per-process emulator: configuration and every piece of state the routes share."""

from __future__ import annotations

from dataclasses import dataclass, field

from emulator.auth import KeyRegistry, PatRegistry, ScopedTokens
from emulator.config import EmulatorConfig
from emulator.faults import FaultTable
from emulator.sqlapi import StatementStore
from emulator.state import EmulatorState


@dataclass
class Emulator:
    """What a route handler gets: config, keys, scoped tokens, faults, channel state and SQL
    statements."""

    config: EmulatorConfig
    state: EmulatorState
    keys: KeyRegistry = field(default_factory=KeyRegistry)
    pats: PatRegistry = field(default_factory=PatRegistry)
    faults: FaultTable = field(default_factory=FaultTable)
    statements: StatementStore = field(default_factory=StatementStore)
    scoped: ScopedTokens = field(init=False)

    def __post_init__(self) -> None:
        self.scoped = ScopedTokens(self.config.scoped_token_ttl)

    @classmethod
    def from_config(cls, config: EmulatorConfig) -> Emulator:
        """Build the emulator and register the keys named on the command line."""
        emu = cls(config=config, state=EmulatorState(config))
        for subject, path in config.public_keys:
            account, _, user = subject.partition(".")
            emu.keys.register(account, user, path.read_bytes())
        return emu
