//! How a query with several modification texts reaches the text encoder.
//!
//! A multi-turn query ("make it blue", then "as a dress") is composed by
//! joining its texts, in the order they were applied, into one sentence
//! sequence. The text encoder attends over the whole sequence, so a later
//! text can override an earlier one ("in blue. in red" requests red), and the
//! fusion head receives a single text embedding. Training on two-step
//! queries joined the same way teaches the model that order.

/// Separator placed between consecutive modification texts.
pub const MODIFICATION_SEPARATOR: &str = ". ";

/// Joins modification texts, trimmed and in order, into the one text the
/// text encoder reads. The serving path and the trainer both call this, so a
/// query is encoded the same way in both.
pub fn join_modifications<S: AsRef<str>>(texts: &[S]) -> String {
    texts
        .iter()
        .map(|text| text.as_ref().trim())
        .filter(|text| !text.is_empty())
        .collect::<Vec<_>>()
        .join(MODIFICATION_SEPARATOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_text_is_returned_trimmed() {
        assert_eq!(join_modifications(&["  make it blue "]), "make it blue");
    }

    #[test]
    fn texts_are_joined_in_order() {
        assert_eq!(
            join_modifications(&["make it blue", "as a dress"]),
            "make it blue. as a dress"
        );
        assert_eq!(
            join_modifications(&["as a dress", "make it blue"]),
            "as a dress. make it blue"
        );
    }

    #[test]
    fn blank_texts_are_skipped() {
        assert_eq!(
            join_modifications(&["in red", "  ", "as a bag"]),
            "in red. as a bag"
        );
    }
}
