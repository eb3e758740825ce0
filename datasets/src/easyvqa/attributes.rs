//! The three easy-VQA shapes and eight shape colours.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{DatasetError, Result};

/// Shape drawn in an easy-VQA image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Shape {
    /// A filled circle.
    Circle,
    /// A filled axis-aligned rectangle.
    Rectangle,
    /// A filled triangle.
    Triangle,
}

impl Shape {
    /// All shapes; [`Shape::index`] is the position here.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Rectangle, Shape::Triangle];

    /// Position in [`Shape::ALL`], 0 to 2.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Name as spelled in easy-VQA's answer list.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Rectangle => "rectangle",
            Shape::Triangle => "triangle",
        }
    }

    /// Name with its indefinite article, e.g. "a circle".
    pub fn with_article(self) -> String {
        crate::class::with_indefinite_article(self.name())
    }
}

/// Colour of the shape in an easy-VQA image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ShapeColour {
    /// RGB (255, 0, 0).
    Red,
    /// RGB (0, 255, 0).
    Green,
    /// RGB (0, 0, 255).
    Blue,
    /// RGB (255, 255, 0).
    Yellow,
    /// RGB (0, 128, 128).
    Teal,
    /// RGB (165, 42, 42).
    Brown,
    /// RGB (128, 128, 128).
    Gray,
    /// RGB (0, 0, 0).
    Black,
}

impl ShapeColour {
    /// All colours; [`ShapeColour::index`] is the position here.
    pub const ALL: [ShapeColour; 8] = [
        ShapeColour::Red,
        ShapeColour::Green,
        ShapeColour::Blue,
        ShapeColour::Yellow,
        ShapeColour::Teal,
        ShapeColour::Brown,
        ShapeColour::Gray,
        ShapeColour::Black,
    ];

    /// Position in [`ShapeColour::ALL`], 0 to 7.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Name as spelled in easy-VQA's answer list ("gray", not "grey").
    pub fn name(self) -> &'static str {
        match self {
            ShapeColour::Red => "red",
            ShapeColour::Green => "green",
            ShapeColour::Blue => "blue",
            ShapeColour::Yellow => "yellow",
            ShapeColour::Teal => "teal",
            ShapeColour::Brown => "brown",
            ShapeColour::Gray => "gray",
            ShapeColour::Black => "black",
        }
    }

    /// Fill colour of the shape in the released PNGs, measured on the images
    /// of easy-vqa 1.0 whose questions name the colour.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            ShapeColour::Red => [255, 0, 0],
            ShapeColour::Green => [0, 255, 0],
            ShapeColour::Blue => [0, 0, 255],
            ShapeColour::Yellow => [255, 255, 0],
            ShapeColour::Teal => [0, 128, 128],
            ShapeColour::Brown => [165, 42, 42],
            ShapeColour::Gray => [128, 128, 128],
            ShapeColour::Black => [0, 0, 0],
        }
    }
}

/// Integer code of a (shape, colour) pair, `shape index * 8 + colour index`, 0 to 23.
pub fn shape_code(shape: Shape, colour: ShapeColour) -> i64 {
    (shape.index() * ShapeColour::ALL.len() + colour.index()) as i64
}

macro_rules! named_enum_traits {
    ($type:ty, $error:ident) => {
        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $type {
            type Err = DatasetError;

            fn from_str(name: &str) -> Result<Self> {
                Self::ALL
                    .into_iter()
                    .find(|value| value.name() == name)
                    .ok_or_else(|| DatasetError::$error {
                        name: name.to_owned(),
                        expected: Self::ALL.map(<$type>::name).join(", "),
                    })
            }
        }

        impl TryFrom<String> for $type {
            type Error = DatasetError;

            fn try_from(name: String) -> Result<Self> {
                name.parse()
            }
        }

        impl From<$type> for String {
            fn from(value: $type) -> Self {
                value.name().to_owned()
            }
        }
    };
}

named_enum_traits!(Shape, InvalidShape);
named_enum_traits!(ShapeColour, InvalidColour);
