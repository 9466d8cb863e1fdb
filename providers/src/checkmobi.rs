//! CheckMobi: missed call by reverse CLI, SMS, and validation/verify.
