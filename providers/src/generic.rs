//! Generic HTTP gateway: URL, method, headers and a body template.
