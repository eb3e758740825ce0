//! easy-VQA shapes: an offline composed retrieval benchmark built from the
//! images of the `easy-vqa` 1.0 Python package (Victor Zhou,
//! github.com/vzhou842/easy-VQA). Each 64x64 image shows one circle,
//! rectangle or triangle in one of eight colours. A query changes the shape,
//! the colour or both, and the relevant items are the other images with the
//! target shape and colour.

mod attributes;
mod data;
mod queries;

use std::collections::BTreeMap;

pub use attributes::{shape_code, Shape, ShapeColour};
pub use data::{
    attributes_from_pixels, default_data_dir, AnnotationSource, EasyVqa, EasyVqaImage,
    EasyVqaSplit, DATA_DIR_ENV,
};
pub use queries::{
    all_shape_texts, default_shape_test_queries, default_two_step_shape_test_queries,
    easyvqa_item_id, generate_shape_queries, generate_two_step_shape_queries,
    parse_easyvqa_item_id, render_shape_template, shape_templates, ShapeIndex, ShapeQuery,
    EASY_VQA_ID_PREFIX, EASY_VQA_TEST_QUERY_COUNT, EASY_VQA_TEST_QUERY_SEED,
    EASY_VQA_TWO_STEP_TEST_QUERY_COUNT, EASY_VQA_TWO_STEP_TEST_QUERY_SEED,
};

impl EasyVqaImage {
    /// Metadata stored with the item: `shape`, `colour`, `split`, `index`,
    /// `shape_from` and `colour_from`, all as strings.
    pub fn metadata(&self, split: crate::Split) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("shape".to_owned(), self.shape.name().to_owned()),
            ("colour".to_owned(), self.colour.name().to_owned()),
            ("split".to_owned(), split.as_str().to_owned()),
            ("index".to_owned(), self.index.to_string()),
            ("shape_from".to_owned(), self.shape_from.as_str().to_owned()),
            (
                "colour_from".to_owned(),
                self.colour_from.as_str().to_owned(),
            ),
        ])
    }
}
