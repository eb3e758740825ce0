//! Checks on client input that the gateway makes before calling a backend.

use crate::error::GatewayError;
use crate::settings::GatewaySettings;

pub fn validate_texts(texts: &[String], settings: &GatewaySettings) -> Result<(), GatewayError> {
    if texts.len() > settings.max_texts {
        return Err(GatewayError::invalid(format!(
            "the search has {} modification texts, more than the limit of {}; send fewer",
            texts.len(),
            settings.max_texts
        )));
    }
    for (index, text) in texts.iter().enumerate() {
        let name = if index == 0 { "text".to_string() } else { format!("more_texts[{}]", index - 1) };
        if text.trim().is_empty() {
            return Err(GatewayError::invalid(format!(
                "{name} is empty; describe the modification, for example \"the same shirt in blue\""
            )));
        }
        let chars = text.chars().count();
        if chars > settings.max_text_chars {
            return Err(GatewayError::invalid(format!(
                "{name} has {chars} characters, more than the limit of {}; shorten it",
                settings.max_text_chars
            )));
        }
    }
    Ok(())
}

pub fn validate_image(image: &[u8], name: &str, settings: &GatewaySettings) -> Result<(), GatewayError> {
    if image.is_empty() {
        return Err(GatewayError::invalid(format!(
            "{name} is empty; send encoded PNG, JPEG, WebP, BMP or GIF bytes"
        )));
    }
    if image.len() > settings.max_image_bytes {
        return Err(GatewayError::invalid(format!(
            "{name} has {} bytes, more than the limit of {}; downscale or recompress it",
            image.len(),
            settings.max_image_bytes
        )));
    }
    Ok(())
}

pub fn validate_id(id: &str, settings: &GatewaySettings) -> Result<(), GatewayError> {
    if id.is_empty() {
        return Err(GatewayError::invalid("the catalog id is empty; ids must be non-empty strings"));
    }
    if id.len() > settings.max_id_bytes {
        return Err(GatewayError::invalid(format!(
            "catalog id {:?}... has {} bytes, more than the limit of {}; use shorter ids",
            id.chars().take(32).collect::<String>(),
            id.len(),
            settings.max_id_bytes
        )));
    }
    if id.chars().any(char::is_control) {
        return Err(GatewayError::invalid(format!("catalog id {id:?} contains control characters; remove them")));
    }
    Ok(())
}
