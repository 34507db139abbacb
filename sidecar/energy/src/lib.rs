//! Energy meters and attribution.
