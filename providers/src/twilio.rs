//! Twilio: Programmable Messaging (SMS), Calls (voice PIN with TwiML) and Verify v2.
