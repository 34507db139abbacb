//! Stop strings: finds the first stop string in generated text and holds back, while streaming,
//! any tail that could still become one.

/// Matches a request's stop strings against a row's text.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
}

/// What the text so far means for the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCheck {
    /// Not stopped; text up to `safe` bytes can be shown (no stop string can start before it).
    Continue { safe: usize },
    /// A stop string starts at `at`: the answer is the text before it.
    Stopped { at: usize },
}

impl StopStrings {
    /// Stop strings; empty ones are ignored.
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// Checks the whole text of a row.
    pub fn check(&self, text: &str) -> StopCheck {
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            return StopCheck::Stopped { at };
        }
        // Hold back the longest suffix of `text` that is a prefix of some stop string.
        let held = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .rev()
                    .filter(move |&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        StopCheck::Continue {
            safe: text.len() - held,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_earliest_stop() {
        let s = StopStrings::new(["\n".to_owned(), "END".to_owned()]);
        assert_eq!(s.check("abc END x\n"), StopCheck::Stopped { at: 4 });
    }

    #[test]
    fn holds_back_a_partial_stop() {
        let s = StopStrings::new(["END".to_owned()]);
        assert_eq!(s.check("abc EN"), StopCheck::Continue { safe: 4 });
        assert_eq!(s.check("abc"), StopCheck::Continue { safe: 3 });
    }

    #[test]
    fn no_stops_means_everything_is_safe() {
        assert_eq!(
            StopStrings::default().check("héllo"),
            StopCheck::Continue { safe: 6 }
        );
    }
}
