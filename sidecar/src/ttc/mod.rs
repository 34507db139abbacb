//! Test-time compute: strategies, answer extraction, verifiers, stopping rules, the budget controller.
