//! Android emulator: SMS through the emulator console on localhost.
