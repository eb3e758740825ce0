//! PNG plots of the training curves and of Recall@K against K.
//!
//! Text is drawn with `ab_glyph` from a TrueType font read at run time, by default DejaVu
//! Sans as Debian's `fonts-dejavu-core` installs it. The font is registered once per process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::error::{Result, TrainerError};
use crate::train::EpochRecord;

/// Environment variable that overrides the font file.
pub const FONT_ENV: &str = "DB4R_PLOT_FONT";

/// Font file used when [`FONT_ENV`] is unset.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Family name under which the font is registered with plotters.
const FAMILY: &str = "sans-serif";

/// Size of every plot in pixels.
const SIZE: (u32, u32) = (1000, 560);

/// Line colours, one per series, from the Tableau 10 palette.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// One named line of a plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points in x order.
    pub points: Vec<(f64, f64)>,
}

static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Registers the font file from [`FONT_ENV`] or [`DEFAULT_FONT`], once per process.
fn ensure_font() -> Result<()> {
    let outcome = FONT.get_or_init(|| {
        let path = std::env::var_os(FONT_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_FONT));
        let bytes = std::fs::read(&path).map_err(|error| {
            format!(
                "failed to read the plot font {}: {error}; install fonts-dejavu-core or set {FONT_ENV} to a TTF file",
                path.display()
            )
        })?;
        // plotters keeps registered fonts for the life of the process, so the bytes are
        // leaked once here.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font(FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a TrueType or OpenType font; set {FONT_ENV} to a TTF file", path.display()))
    });
    outcome.clone().map_err(TrainerError::Plot)
}

fn plot_error(path: &Path, error: impl std::fmt::Display) -> TrainerError {
    TrainerError::Plot(format!("failed to draw {}: {error}", path.display()))
}

/// Draws the training loss and the validation Recall@10 per epoch, one line per variant,
/// side by side, into the PNG file `path`.
pub fn plot_training_curves(path: &Path, histories: &[(String, Vec<EpochRecord>)]) -> Result<()> {
    let losses: Vec<Series> = histories
        .iter()
        .map(|(label, history)| Series {
            label: label.clone(),
            points: history
                .iter()
                .map(|record| (record.epoch as f64, record.loss))
                .collect(),
        })
        .collect();
    let recalls: Vec<Series> = histories
        .iter()
        .map(|(label, history)| Series {
            label: label.clone(),
            points: history
                .iter()
                .map(|record| (record.epoch as f64, record.validation_recall_at_10))
                .collect(),
        })
        .collect();

    ensure_font()?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|error| plot_error(path, error))?;
    let panels = root.split_evenly((1, 2));
    draw_lines(
        &panels[0],
        path,
        "Training loss",
        "epoch",
        "loss",
        &losses,
        None,
    )?;
    draw_lines(
        &panels[1],
        path,
        "Validation Recall@10",
        "epoch",
        "Recall@10",
        &recalls,
        Some((0.0, 1.0)),
    )?;
    root.present().map_err(|error| plot_error(path, error))
}

/// Draws Recall@K against K, one line per method, into the PNG file `path`.
pub fn plot_recall_at_k(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|error| plot_error(path, error))?;
    draw_lines(
        &root,
        path,
        title,
        "K",
        "Recall@K",
        series,
        Some((0.0, 1.0)),
    )?;
    root.present().map_err(|error| plot_error(path, error))
}

fn draw_lines(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> Result<()> {
    let points = series.iter().flat_map(|series| series.points.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in points {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !x_min.is_finite() || !y_min.is_finite() {
        return Err(TrainerError::Plot(format!(
            "no finite points to draw in {title:?} of {}",
            path.display()
        )));
    }
    if x_max <= x_min {
        x_max = x_min + 1.0;
    }
    let (y_min, y_max) = match y_range {
        Some(range) => range,
        None if y_max > y_min => {
            let pad = 0.05 * (y_max - y_min);
            (y_min - pad, y_max + pad)
        }
        None => (y_min - 0.5, y_max + 0.5),
    };

    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x_min..x_max, y_min..y_max)
        .map_err(|error| plot_error(path, error))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FAMILY, 14))
        .draw()
        .map_err(|error| plot_error(path, error))?;

    for (position, line) in series.iter().enumerate() {
        let colour = PALETTE[position % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                line.points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(|error| plot_error(path, error))?
            .label(line.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
        if line.points.len() <= 20 {
            chart
                .draw_series(
                    line.points
                        .iter()
                        .map(|&point| Circle::new(point, 3, colour.filled())),
                )
                .map_err(|error| plot_error(path, error))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FAMILY, 14))
        .draw()
        .map_err(|error| plot_error(path, error))?;
    Ok(())
}
