//! Vonage (Nexmo): SMS API and Verify.
