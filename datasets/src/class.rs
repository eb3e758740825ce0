//! The ten Fashion-MNIST classes, named as they read in a sentence.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{DatasetError, Result};

/// A Fashion-MNIST class, in label order (label 0 is [`FashionClass::TShirt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FashionClass {
    /// Label 0, "T-shirt/top" in the release.
    TShirt,
    /// Label 1, "Trouser" in the release.
    Trousers,
    /// Label 2.
    Pullover,
    /// Label 3.
    Dress,
    /// Label 4.
    Coat,
    /// Label 5.
    Sandal,
    /// Label 6.
    Shirt,
    /// Label 7.
    Sneaker,
    /// Label 8.
    Bag,
    /// Label 9.
    AnkleBoot,
}

impl FashionClass {
    /// All classes in label order.
    pub const ALL: [FashionClass; 10] = [
        FashionClass::TShirt,
        FashionClass::Trousers,
        FashionClass::Pullover,
        FashionClass::Dress,
        FashionClass::Coat,
        FashionClass::Sandal,
        FashionClass::Shirt,
        FashionClass::Sneaker,
        FashionClass::Bag,
        FashionClass::AnkleBoot,
    ];

    /// Class of a Fashion-MNIST label byte, `None` above 9.
    pub fn from_label(label: u8) -> Option<Self> {
        Self::ALL.get(label as usize).copied()
    }

    /// Label byte of the class (0 to 9).
    pub fn label(self) -> u8 {
        self as u8
    }

    /// Short lower-case name used in metadata and query text, e.g. "ankle boot".
    pub fn name(self) -> &'static str {
        match self {
            FashionClass::TShirt => "t-shirt",
            FashionClass::Trousers => "trousers",
            FashionClass::Pullover => "pullover",
            FashionClass::Dress => "dress",
            FashionClass::Coat => "coat",
            FashionClass::Sandal => "sandal",
            FashionClass::Shirt => "shirt",
            FashionClass::Sneaker => "sneaker",
            FashionClass::Bag => "bag",
            FashionClass::AnkleBoot => "ankle boot",
        }
    }

    /// Countable noun phrase for the class, which differs from [`Self::name`]
    /// only for the plural "trousers" ("pair of trousers").
    pub fn noun(self) -> &'static str {
        match self {
            FashionClass::Trousers => "pair of trousers",
            other => other.name(),
        }
    }

    /// Noun phrase with its indefinite article, e.g. "an ankle boot".
    pub fn with_article(self) -> String {
        with_indefinite_article(self.noun())
    }
}

impl fmt::Display for FashionClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FashionClass {
    type Err = DatasetError;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|class| class.name() == name)
            .ok_or_else(|| DatasetError::InvalidClass {
                name: name.to_owned(),
                expected: Self::ALL.map(FashionClass::name).join(", "),
            })
    }
}

impl TryFrom<String> for FashionClass {
    type Error = DatasetError;

    fn try_from(name: String) -> Result<Self> {
        name.parse()
    }
}

impl From<FashionClass> for String {
    fn from(class: FashionClass) -> Self {
        class.name().to_owned()
    }
}

/// Prefixes "a" or "an" by the first letter of `phrase`, which is right for
/// every class and colour name of this benchmark.
pub(crate) fn with_indefinite_article(phrase: &str) -> String {
    let article = match phrase.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    };
    format!("{article} {phrase}")
}
