//! Byte counts from Kubernetes quantities (`16Gi`, `80G`, `1.5e9`, `81559Mi`).

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::fmt;

/// A quantity that is not a whole, non-negative number of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityError {
    pub quantity: String,
}

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a byte quantity (expected e.g. 16Gi, 80G or 1.5e9)",
            self.quantity
        )
    }
}

impl std::error::Error for QuantityError {}

/// Parses a quantity as bytes, rounding a fractional result up.
pub fn parse_bytes(quantity: &Quantity) -> Result<u64, QuantityError> {
    parse_bytes_str(&quantity.0)
}

/// Parses the text of a quantity as bytes, rounding a fractional result up.
pub fn parse_bytes_str(text: &str) -> Result<u64, QuantityError> {
    let error = || QuantityError {
        quantity: text.to_owned(),
    };
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| error())?;
    let scale: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent if exponent.starts_with(['e', 'E']) => {
            let power: i32 = exponent[1..].parse().map_err(|_| error())?;
            10f64.powi(power)
        }
        _ => return Err(error()),
    };
    let bytes = (number * scale).ceil();
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(error());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_decimal_and_exponent_suffixes() {
        assert_eq!(parse_bytes_str("16Gi"), Ok(16 << 30));
        assert_eq!(parse_bytes_str("80G"), Ok(80_000_000_000));
        assert_eq!(parse_bytes_str("1.5e9"), Ok(1_500_000_000));
        assert_eq!(parse_bytes_str("81559Mi"), Ok(81559 << 20));
        assert_eq!(parse_bytes_str("512"), Ok(512));
        assert_eq!(parse_bytes_str("0.5Ki"), Ok(512));
    }

    #[test]
    fn rejects_what_is_not_a_byte_count() {
        for bad in ["", "Gi", "16 apples", "-1Gi", "100m", "1e"] {
            assert!(parse_bytes_str(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
